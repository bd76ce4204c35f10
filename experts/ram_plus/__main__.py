"""``python -m experts.ram_plus --print-state-dict-shapes [--variant swin_l] [--image-size 384]``"""
from __future__ import annotations

import argparse
import json
import sys

from .model import OFFICIAL_DESCRIPTIONS_PER_TAG, OFFICIAL_NUM_TAGS, official_state_dict_shapes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experts.ram_plus", description=__doc__)
    parser.add_argument("--print-state-dict-shapes", action="store_true",
                        help="print {name: shape} of the configuration, built with no weights (meta device)")
    parser.add_argument("--variant", choices=("swin_l", "swin_b", "tiny"), default="swin_l")
    parser.add_argument("--image-size", type=int, default=384, choices=(224, 384),
                        help="input size of the swin variants (ignored for tiny)")
    parser.add_argument("--num-tags", type=int, default=OFFICIAL_NUM_TAGS)
    parser.add_argument("--descriptions-per-tag", type=int, default=OFFICIAL_DESCRIPTIONS_PER_TAG)
    args = parser.parse_args(argv)
    if not args.print_state_dict_shapes:
        parser.print_help(sys.stderr)
        return 2
    shapes = official_state_dict_shapes(args.variant, args.image_size, args.num_tags, args.descriptions_per_tag)
    json.dump(shapes, sys.stdout, indent=1)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
