"""Sustained load: a fixed message rate for a long time, memory (RSS) sampled.

    python bench/bench_sustained.py                 # 10 minutes at 300 msg/s
    python bench/bench_sustained.py --minutes 1     # a quick look

The real daemon (SQLite, synchronous=FULL, demo clinic, built-in plugins) gets
the ingest benchmark's generated ADT/SIU traffic at a steady rate over 4
connections.  Printed: the rate achieved, ACK latency p50/p99 per minute, the
daemon's RSS at the start, the peak and the end, and the growth from the
second minute (after warm-up) to the end — an ever-growing RSS is a leak.
The same-run baseline is the RSS of an idle daemon over the same warm-up.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_ingest import generate  # noqa: E402
from common import Daemon, DaemonSettings, child_pids, machine_info, machine_line, percentile, print_table  # noqa: E402

from hl7.client import MLLPClient, check_ack  # noqa: E402

CONNECTIONS = 4


def rss_mib(pid: int) -> float:
    """Resident memory of the daemon and its children (the applier process)."""
    total = 0.0
    for process in (pid, *child_pids(pid)):
        try:
            lines = Path(f"/proc/{process}/status").read_text().splitlines()
        except OSError:
            continue
        total += next((int(line.split()[1]) / 1024 for line in lines if line.startswith("VmRSS:")), 0.0)
    return total or float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--rate", type=float, default=300.0, help="messages per second, all connections together")
    parser.add_argument("--quick", action="store_true", help="1 minute")
    args = parser.parse_args()
    minutes = 1.0 if args.quick else args.minutes
    total = int(args.rate * minutes * 60)
    items = generate(total, tag="S")
    lanes = [items[i::CONNECTIONS] for i in range(CONNECTIONS)]
    info = machine_info()

    with tempfile.TemporaryDirectory(prefix="slotengine-sustained-") as directory:
        daemon = Daemon(DaemonSettings(Path(directory), f"sqlite:///{Path(directory) / 'sustained.db'}")).start()
        try:
            idle_start = rss_mib(daemon.pid)
            time.sleep(5)
            idle_end = rss_mib(daemon.pid)
            samples: list[tuple[float, float]] = []
            latencies: list[list[float]] = [[] for _ in range(int(minutes) + 1)]
            failures: list[str] = []
            started = time.monotonic()
            per_lane_interval = CONNECTIONS / args.rate
            stop = threading.Event()

            def send(lane):
                client = MLLPClient("127.0.0.1", daemon.port("ehr"), timeout=30)
                next_at = time.monotonic()
                try:
                    for item in lane:
                        delay = next_at - time.monotonic()
                        if delay > 0:
                            time.sleep(delay)
                        next_at += per_lane_interval
                        sent = time.monotonic()
                        ok, code, text = check_ack(item.control_id, client.send(item.raw))
                        latencies[min(int((sent - started) // 60), len(latencies) - 1)].append(time.monotonic() - sent)
                        if not ok:
                            failures.append(f"{item.control_id}: {code} {text}")
                finally:
                    client.close()

            def sample():
                while not stop.wait(5):
                    samples.append((time.monotonic() - started, rss_mib(daemon.pid)))

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            threads = [threading.Thread(target=send, args=(lane,)) for lane in lanes]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            elapsed = time.monotonic() - started
            stop.set()
            sampler.join()
        finally:
            daemon.stop()

    after_warmup = [rss for t, rss in samples if t >= 60] or [rss for _t, rss in samples]
    rows = []
    for minute, values in enumerate(latencies):
        if values:
            rows.append((f"minute {minute + 1}", len(values), f"{percentile(values, 50) * 1000:.1f}",
                         f"{percentile(values, 99) * 1000:.1f}"))
    print(f"\nslotengine sustained load: {total} messages at {args.rate:.0f}/s target over {CONNECTIONS} connections")
    print(machine_line(info))
    print_table(["window", "messages", "ACK p50 ms", "ACK p99 ms"], rows)
    result = {
        "bench": "sustained",
        "minutes": minutes,
        "target_rate": args.rate,
        "achieved_rate": round(total / elapsed, 1),
        "failures": len(failures),
        "rss_idle_mib": [round(idle_start, 1), round(idle_end, 1)],
        "rss_first_mib": round(after_warmup[0], 1) if after_warmup else None,
        "rss_peak_mib": round(max(after_warmup), 1) if after_warmup else None,
        "rss_end_mib": round(after_warmup[-1], 1) if after_warmup else None,
        "rss_growth_after_warmup_mib": round(after_warmup[-1] - after_warmup[0], 1) if after_warmup else None,
        "machine": info,
    }
    print(f"RSS: idle {idle_start:.1f} -> {idle_end:.1f} MiB (baseline); under load from minute 2: "
          f"{result['rss_first_mib']} -> {result['rss_end_mib']} MiB (peak {result['rss_peak_mib']}); "
          f"rate achieved {result['achieved_rate']}/s; failures {len(failures)}")
    print(json.dumps(result))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
