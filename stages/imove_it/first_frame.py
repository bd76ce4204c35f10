"""The clip's first frame, read once for the stages that work on it (tagging and detection)."""
from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class FirstFrame:
    image: np.ndarray
    t_s: float
    index: int


class FrameReadError(RuntimeError):
    pass


def clip_first_frame(video_path: str, start_s: float, end_s: float) -> FirstFrame:
    """The first decoded frame of ``[start_s, end_s)`` (the clip's initial frame, upright RGB)."""
    from experts.video import VideoProbeError, iter_frames

    try:
        for frame in iter_frames(video_path, start_s=start_s, end_s=end_s):
            return FirstFrame(frame.image, float(frame.t_s), int(frame.index))
    except VideoProbeError as exc:
        raise FrameReadError(f"cannot decode {video_path}: {exc.reason}") from exc
    except (OSError, ValueError) as exc:
        raise FrameReadError(f"cannot decode {video_path} in [{start_s:.3f}, {end_s:.3f}) s: "
                             f"{type(exc).__name__}: {exc}") from exc
    raise FrameReadError(f"no frame decoded in [{start_s:.3f}, {end_s:.3f}) s of {video_path}; "
                         f"the clip span is past the end of the video or the file is truncated")
