#!/usr/bin/env python
"""Run every benchmark (``bench/bench_*.py``) and simulation (``bench/sim_*.py``) and summarise them.

    python bench/run_all.py                 # each in its quick form where it has one
    python bench/run_all.py --full          # each at its full size (passes --full where supported)
    python bench/run_all.py --only ingest slots
    python bench/run_all.py --database postgresql://postgres@127.0.0.1/test   # to benches that take --database
    python bench/run_all.py --list

The scripts are found by glob, so a new ``bench_<name>.py`` or ``sim_<name>.py``
is picked up as it lands. They run one after another (never together: each
measures the machine), each in its own process with the project's interpreter.
A script takes part in a mode only through the options it declares:
``--quick`` is passed when the script's source mentions it (else the script
runs as it is), ``--full`` in full mode likewise, ``--database`` likewise.

Each script prints its result as a JSON object on its last JSON line (a
``BENCH `` prefix is allowed). This prints one row per script (status, time,
headline figures), then one JSON line (``BENCH {...}``) holding every
script's JSON, exit code and duration, with the machine and load average.
Exit status: 0 when every script exited 0, else 1.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    REPO,
    load_average,
    machine_info,
    machine_line,
    print_table,
    source_revision,
)

BENCH_DIR = Path(__file__).resolve().parent
#: Keys that make good headlines, by preference (first match wins per key).
HEADLINE = re.compile(r"(per_s|_ms|p50|p95|p99|ratio|speedup|x_|seconds|_s$)", re.IGNORECASE)
PREFERRED = re.compile(r"(per_s|p95|p99|ratio|speedup)", re.IGNORECASE)
#: Parts of a result that are context, not figures.
SKIPPED_KEYS = {"machine", "source", "targets", "targets_met", "mix", "runs", "baseline", "command"}


def discover(only: list[str]) -> list[Path]:
    scripts = sorted(p for pattern in ("bench_*.py", "sim_*.py") for p in BENCH_DIR.glob(pattern) if p.is_file())
    if only:
        wanted = {o.removeprefix("bench_").removesuffix(".py") for o in only}
        scripts = [p for p in scripts if p.stem.removeprefix("bench_") in wanted]
    return scripts


def supports(script: Path, option: str) -> bool:
    """Whether the script declares ``option`` (read from its source, not by running it)."""
    try:
        return re.search(rf"""["']{re.escape(option)}["']""", script.read_text()) is not None
    except OSError:
        return False


def last_json(text: str) -> dict | None:
    for line in reversed(text.splitlines()):
        line = line.strip()
        line = line.removeprefix("BENCH ")
        if line.startswith("{") and line.endswith("}"):
            try:
                value = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(value, dict):
                return value
    return None


def _numbers(result: dict, prefix: str = "", depth: int = 0):
    """(dotted key, number) for the scalars of a result and of the dicts inside it (one level)."""
    for key, value in result.items():
        if key in SKIPPED_KEYS:
            continue
        if isinstance(value, dict) and depth == 0:
            yield from _numbers(value, f"{key}.", depth + 1)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            yield f"{prefix}{key}", value


def headline(result: dict | None, limit: int = 6) -> str:
    """A few figures of a result for the table: rates, percentiles and ratios first."""
    if not result:
        return ""
    numbers = list(_numbers(result))
    ranked = [kv for kv in numbers if PREFERRED.search(kv[0])] or [kv for kv in numbers if HEADLINE.search(kv[0])] \
        or numbers
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in ranked[:limit])


def run_one(script: Path, args) -> dict:
    command = [sys.executable, str(script)]
    mode = "as is"
    if args.full:
        if supports(script, "--full"):
            command.append("--full")
            mode = "--full"
        else:
            mode = "default (full)"
    elif supports(script, "--quick"):
        command.append("--quick")
        mode = "--quick"
    if args.database and supports(script, "--database"):
        command += ["--database", args.database]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH", "")]))}
    print(f"=== {script.name} ({mode}): {' '.join(command[1:])}", flush=True)
    load_before = load_average()
    started = time.monotonic()
    try:
        proc = subprocess.run(command, check=False, cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=args.timeout)
        code, stdout, stderr = proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as exc:
        code = None
        stdout = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        stderr = f"timed out after {args.timeout:.0f} s"
    seconds = time.monotonic() - started
    if args.verbose or code != 0:
        sys.stdout.write(stdout)
        if stderr.strip():
            sys.stdout.write(stderr if code != 0 else "")
    else:  # the script's own summary, without its JSON line
        sys.stdout.write("\n".join(line for line in stdout.splitlines()
                                   if not line.startswith(("BENCH ", "{"))) + "\n")
    result = last_json(stdout)
    status = "ok" if code == 0 else ("timeout" if code is None else f"exit {code}")
    if code == 0 and result is None:
        status = "ok (no JSON line)"
    return {
        "script": script.name, "mode": mode, "command": command[1:], "status": status, "exit_code": code,
        "seconds": round(seconds, 1), "loadavg_before": load_before, "loadavg_after": load_average(),
        "result": result, "stderr_tail": stderr[-1500:] if code != 0 else "",
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--full", action="store_true", help="full-size runs (default: quick where a script has --quick)")
    ap.add_argument("--only", nargs="+", default=[], metavar="NAME", help="run only these (ingest, slots, ...)")
    ap.add_argument("--database", metavar="URL", help="passed to the scripts that take --database")
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds per script (default 3600)")
    ap.add_argument("--verbose", action="store_true", help="print each script's whole output")
    ap.add_argument("--list", action="store_true", help="list the scripts and the options each supports")
    args = ap.parse_args()

    scripts = discover(args.only)
    if args.list:
        for script in scripts:
            flags = [o for o in ("--quick", "--full", "--database") if supports(script, o)]
            print(f"{script.name:24} {' '.join(flags) or '(no options)'}")
        return 0
    if not scripts:
        print("no bench/bench_*.py or bench/sim_*.py scripts matched", file=sys.stderr)
        return 1

    info = machine_info()
    revision = source_revision()
    print(machine_line(info), flush=True)
    started = time.monotonic()
    runs = [run_one(script, args) for script in scripts]
    total = time.monotonic() - started

    print(f"\nslotengine benchmarks ({'full' if args.full else 'quick'}), {total:,.0f} s")
    print(machine_line(info) + "\n")
    rows = []
    for run in runs:
        load = f"{(run['loadavg_before'] or ['?'])[0]}/{(run['loadavg_after'] or ['?'])[0]}"
        rows.append([run["script"], run["mode"], run["status"], f"{run['seconds']:.0f}", load,
                     headline(run["result"])[:160]])
    print_table(["script", "mode", "status", "seconds", "load 1m", "headline figures"], rows)
    combined = {
        "bench": "all", "mode": "full" if args.full else "quick", "machine": info, "source": revision,
        "seconds": round(total, 1),
        "ok": all(run["exit_code"] == 0 for run in runs),
        "scripts": {run["script"].removesuffix(".py"): {k: v for k, v in run.items() if k != "script"}
                    for run in runs},
    }
    print("BENCH " + json.dumps(combined, sort_keys=True, default=str))
    return 0 if combined["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
