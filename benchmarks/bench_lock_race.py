"""Run-lock race: C processes take one root's lock at the same instant, R rounds, with and without a stale lock.

Each round uses a fresh root. With ``stale``, the root starts with a lock left by a dead process on this host
(what a SIGKILLed run leaves), so every contender tries to take it over at once. Reports, per mode, the rounds
in which two contenders held the lock at the same time (overlapping holding intervals), contenders that crashed
(any exception other than the expected "root is locked" refusal), rounds nobody won, and locks left behind.

    .venv/bin/python benchmarks/bench_lock_race.py [--contenders 6] [--rounds 30] [--hold-s 0.3] [--json out.json]

Target: 0 double holders, 0 crashes, 0 rounds without a winner, 0 locks left.
"""
from __future__ import annotations

import argparse
import collections
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests._lock_race import race_round  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--contenders", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--hold-s", type=float, default=0.3)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    logging.getLogger("motionforge.storage.lock").setLevel(logging.ERROR)  # one takeover line per stale round
    report = {}
    with tempfile.TemporaryDirectory(prefix="mf-lock-race-") as tmp:
        for stale in (True, False):
            mode = "stale lock" if stale else "no lock"
            t0 = time.perf_counter()
            doubles = crashes = no_winner = left = 0
            errors: collections.Counter = collections.Counter()
            wins = []
            for r in range(a.rounds):
                res = race_round(Path(tmp, mode.replace(" ", "-"), f"round-{r}", "root"), a.contenders, stale, a.hold_s)
                doubles += res["double"]
                crashes += len(res["crashed"])
                errors.update(c.get("error", "?").split(":")[0] for c in res["crashed"])
                no_winner += res["held"] == 0
                left += res["lock_left"]
                wins.append(res["held"])
            report[mode] = {"rounds": a.rounds, "contenders": a.contenders, "double_holder_rounds": doubles,
                            "crashed_contenders": crashes, "crash_kinds": dict(errors), "rounds_without_winner": no_winner,
                            "locks_left": left, "winners_per_round": dict(collections.Counter(wins)),
                            "seconds": round(time.perf_counter() - t0, 1)}
            r = report[mode]
            print(f"{mode:>10}: {a.rounds} rounds x {a.contenders} contenders: double holders in {doubles} rounds, "
                  f"{crashes} of {a.rounds * a.contenders} contenders crashed {dict(errors) or ''}, "
                  f"{no_winner} rounds without a winner, {left} locks left; winners per round {r['winners_per_round']} "
                  f"({r['seconds']} s)")
    if a.json:
        a.json.write_text(json.dumps(report, indent=1))
    bad = sum(v["double_holder_rounds"] + v["crashed_contenders"] + v["rounds_without_winner"] + v["locks_left"]
              for v in report.values())
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
