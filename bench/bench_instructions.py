#!/usr/bin/env python
"""Instructions per applied message: an A/B of the apply path that machine noise does not blur.

    python bench/bench_instructions.py                          # this checkout
    python bench/bench_instructions.py --against ../main-before # and another checkout, same run: the ratio

On a shared virtual machine the same commit's ``bench_apply`` CPU time per message
varies by ±20 % from one run to the next, more than most single changes to the apply
path gain.  The number of instructions executed does not: this runs ``bench_apply``'s
all-plugins arm under ``valgrind --tool=cachegrind`` (no cache simulation) with two
message counts and reports the difference divided by the extra messages: start-up,
imports and the clinic's set-up cancel out.  Batches end by size alone (not after
``hl7.processor.BATCH_SECONDS``, which valgrind's slowness would turn into batches of a
message or two), as in a daemon working through a backlog.  About a minute and a half per checkout; needs valgrind.

Prints a table, then one JSON line (``BENCH {...}``).
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def child(root: Path, messages: int) -> None:
    """The all-plugins arm of ``bench_apply`` on ``messages`` messages, from checkout ``root``."""
    sys.path[:0] = [str(root / "bench"), str(root)]
    import bench_apply
    from bench_ingest import generate

    from hl7 import processor

    # Batches end by size alone, as in a daemon with a backlog: cut by wall time, they
    # would hold a message or two under valgrind, and a different number every run.
    processor.BATCH_SECONDS = processor.DEPTH_EVERY_SECONDS = float("inf")

    raws = [item.raw for item in generate(messages, seed=1)]
    with tempfile.TemporaryDirectory() as workdir:
        result = bench_apply.run_arm(raws, plugins=True, workdir=Path(workdir))
    if result["failed"]:
        raise SystemExit(f"{result['failed']} messages not applied")


def instructions(root: Path, messages: int) -> int:
    run = subprocess.run(
        ["valgrind", "--tool=cachegrind", "--cache-sim=no", "--cachegrind-out-file=/dev/null",
         sys.executable, __file__, "--child", str(root), str(messages)],
        capture_output=True, text=True, cwd=tempfile.gettempdir())
    found = re.search(r"I\s+refs:\s+([\d,]+)", run.stderr)
    if run.returncode != 0 or found is None:
        raise SystemExit(f"valgrind run of {root} ({messages} messages) failed:\n{run.stderr[-2000:]}")
    return int(found.group(1).replace(",", ""))


def per_message(root: Path, small: int, large: int) -> float:
    return (instructions(root, large) - instructions(root, small)) / (large - small)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--against", type=Path, help="another checkout of slotengine, measured in the same run")
    parser.add_argument("--messages", type=int, nargs=2, default=(200, 800), metavar=("SMALL", "LARGE"))
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(Path(args.child[0]), int(args.child[1]))
        return 0
    if shutil.which("valgrind") is None:
        print("valgrind not found: apt-get install valgrind", file=sys.stderr)
        return 2
    small, large = args.messages
    checkouts = {"this checkout": HERE.parent}
    if args.against:
        if not (args.against / "bench" / "bench_apply.py").exists():
            print(f"--against {args.against}: no bench/bench_apply.py there", file=sys.stderr)
            return 2
        checkouts["--against"] = args.against.resolve()
    figures = {name: per_message(root, small, large) for name, root in checkouts.items()}
    print(f"\nslotengine apply, instructions per message (all built-in plugins; "
          f"{large} - {small} messages under valgrind)\n")
    for name, count in figures.items():
        print(f"  {name:14} {count / 1e6:8.3f} M   {checkouts[name]}")
    result = {"bench": "instructions", "messages": [small, large],
              "per_message": {name: round(count) for name, count in figures.items()}}
    if args.against:
        result["ratio"] = round(figures["this checkout"] / figures["--against"], 4)
        print(f"\n  this checkout / --against: x{result['ratio']:.3f}")
    print("BENCH " + json.dumps(result, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
