"""Helpers shared by the bench scripts: machine figures, percentiles, tables, and a
real ``slotengine serve`` process to measure.

Benchmarks must not import from ``tests/``; the daemon launcher here follows the
same idea as ``tests/e2e/daemon.py`` (write a TOML configuration, start
``python -m hl7.cli serve --config FILE``, wait for ``/healthz``, SIGTERM to stop).
"""
from __future__ import annotations

import json
import math
import os
import platform
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


# --- the machine ---------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> tuple[float, float, float] | None:
    try:
        one, five, fifteen = os.getloadavg()
        return round(one, 2), round(five, 2), round(fifteen, 2)
    except OSError:
        return None


def machine_info() -> dict:
    """CPU model, cores, Python, SQLite and platform: printed with every result."""
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "platform": platform.platform(),
        "loadavg": load_average(),
    }


def source_revision() -> dict:
    """The commit measured, and whether the working tree differed from it (others edit concurrently)."""
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], check=False, cwd=REPO, capture_output=True, text=True,
                                  timeout=10).stdout.rstrip()  # porcelain lines start with a space
        except (OSError, subprocess.SubprocessError):
            return ""

    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": git("rev-parse", "--short", "HEAD") or None, "dirty": bool(status),
            "dirty_files": [line[3:] for line in status.splitlines()][:20]}


def machine_line(info: dict) -> str:
    load = info.get("loadavg")
    load_text = " / ".join(f"{x:.2f}" for x in load) if load else "?"
    return (f"{info['cpu']}, {info['cores']} cores, Python {info['python']}, SQLite {info['sqlite']}, "
            f"{info['platform']}; load average (1/5/15 min) at start {load_text}")


# --- numbers -------------------------------------------------------------------------------


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100) of unsorted values; nan when empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def print_table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> None:
    rows = [[str(c) for c in row] for row in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in rows)) if rows else len(str(h)) for i, h in enumerate(headers)]
    print("  ".join(str(h).ljust(w) for h, w in zip(headers, widths)).rstrip())
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())


def process_cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a process and its live children (the daemon's
    applier process), all threads, from /proc; None elsewhere."""
    own = own_cpu_seconds(pid)
    if own is None:
        return None
    return own + sum(process_cpu_seconds(child) or 0.0 for child in child_pids(pid))


def own_cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of one process, all threads, children left out; None elsewhere."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def child_pids(pid: int) -> set[int]:
    """The live children of a process (the daemon's applier and multiprocessing's tracker), from /proc."""
    children = set()
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children.update(int(c) for c in (task / "children").read_text().split())
        except (OSError, ValueError):
            pass
    return children


# --- sockets -------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- a real daemon -------------------------------------------------------------------------


def plugin_names() -> tuple[list[str], list[str]]:
    """(built-in plugin names, names installed through the ``slotengine.plugins`` entry points).

    A development environment may have test plugins installed (the e2e suite's
    sample vendor and a deliberately misbehaving plugin); the demo runs only the
    built-ins, so the benchmarks leave the others out unless asked."""
    from importlib.metadata import entry_points

    from engine.plugin import ENTRY_POINT_GROUP
    from engine.plugin_host import BUILTIN_PLUGINS

    installed = sorted({ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)})
    return [name for name, _module in BUILTIN_PLUGINS], installed


def installed_non_builtin_plugins() -> list[str]:
    builtin, installed = plugin_names()
    return [name for name in installed if name not in builtin]


@dataclass
class DaemonSettings:
    """What goes into the daemon's TOML configuration.

    ``plugins_disabled`` names plugins to disable; unless ``builtin_plugins_only``
    is False, plugins installed in this environment that are not built-ins are
    disabled too, so the daemon runs the demo's plugin set."""

    directory: Path
    database_url: str
    clinic_data: Path | None = REPO / "config" / "demo-clinic.toml"
    timezone: str = "America/New_York"
    log_level: str = "INFO"
    plugins_disabled: tuple[str, ...] = ()
    feeds: list[dict] = field(default_factory=lambda: [{"name": "ehr", "mode": "mirror"}])
    grace_seconds: float = 10.0
    extra: str = ""
    builtin_plugins_only: bool = True

    @property
    def disabled_plugins(self) -> list[str]:
        extra = installed_non_builtin_plugins() if self.builtin_plugins_only else []
        return list(dict.fromkeys([*self.plugins_disabled, *extra]))

    def write(self) -> Path:
        self.http_port = free_port()
        lines = ["[database]", f"url = {json.dumps(self.database_url)}", ""]
        lines += ["[clinic]"]
        if self.clinic_data is not None:
            lines.append(f"data = {json.dumps(str(self.clinic_data))}")
        lines += [f"timezone = {json.dumps(self.timezone)}", ""]
        lines += ["[logging]", f"level = {json.dumps(self.log_level)}", ""]
        lines += ["[http]", f'listen = "127.0.0.1:{self.http_port}"', ""]
        lines += ["[shutdown]", f"grace_seconds = {self.grace_seconds}", ""]
        lines += ["[plugins]", f"disabled = {json.dumps(self.disabled_plugins)}", ""]
        for feed in self.feeds:
            feed.setdefault("port", free_port())
            lines.append("[[feeds]]")
            lines += [f"{key} = {json.dumps(value)}" for key, value in feed.items() if key != "port"]
            lines += [f'listen = "127.0.0.1:{feed["port"]}"', ""]
        path = self.directory / "slotengine.toml"
        path.write_text("\n".join(lines) + "\n" + self.extra)
        return path


class Daemon:
    """``python -m hl7.cli serve --config FILE`` in a subprocess; its output goes to a log file."""

    def __init__(self, settings: DaemonSettings, *, env: dict | None = None):
        self.settings = settings
        self.config_path = settings.write()
        self.log_path = settings.directory / "daemon.log"
        self.env = {**os.environ, **(env or {})}
        self.env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), self.env.get("PYTHONPATH", "")]))
        self.proc: subprocess.Popen | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def port(self, feed: str = "ehr") -> int:
        return next(f["port"] for f in self.settings.feeds if f["name"] == feed)

    def start(self, timeout: float = 60.0) -> Daemon:
        self._log_file = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "hl7.cli", "serve", "--config", str(self.config_path)],
            stdout=self._log_file, stderr=subprocess.STDOUT, env=self.env, cwd=self.settings.directory,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self._log_file.close()
                raise RuntimeError(f"daemon exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if self.health()[0] == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.1)
        self.stop(10)  # never leave a half-started daemon behind
        raise TimeoutError(f"daemon not ready after {timeout:.0f} s:\n{self.log_tail()}")

    def _get(self, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
        url = f"http://127.0.0.1:{self.settings.http_port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read() or b""

    def health(self) -> tuple[int, dict]:
        status, body = self._get("/healthz", 2.0)
        return status, json.loads(body or b"{}")

    def metrics(self) -> dict[str, float]:
        """The Prometheus exposition as {"name{labels}": value}, plus label-less sums per name."""
        _status, body = self._get("/metrics")
        return parse_prometheus(body.decode())

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self, timeout: float = 30.0) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()
        finally:
            self._log_file.close()


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)")


def parse_prometheus(text: str) -> dict[str, float]:
    values: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = _SAMPLE.match(line)
        if not match:
            continue
        name, labels, value = match.groups()
        try:
            number = float(value)
        except ValueError:
            continue
        values[name + (labels or "")] = number
        values[name] = values.get(name, 0.0) + number if labels else number
    return values


# --- profiling -----------------------------------------------------------------------------


def py_spy_path() -> str | None:
    """py-spy next to this interpreter, else on PATH."""
    candidate = Path(sys.executable).parent / "py-spy"
    if candidate.exists():
        return str(candidate)
    from shutil import which

    return which("py-spy")


def start_py_spy(pid: int, output: Path, *, rate: int = 250, fmt: str = "raw") -> subprocess.Popen | None:
    """Sample ``pid`` (all threads, with idle frames dropped) until stopped with SIGINT."""
    exe = py_spy_path()
    if exe is None:
        print("py-spy not found: pip install py-spy (profile skipped)", file=sys.stderr)
        return None
    return subprocess.Popen([exe, "record", "--pid", str(pid), "--rate", str(rate), "--format", fmt,
                             "--output", str(output), "--threads", "--subprocesses", "--nonblocking"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def stop_py_spy(proc: subprocess.Popen | None, timeout: float = 60.0) -> None:
    if proc is None:
        return
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def summarize_collapsed(path: Path, top: int = 25, own: Sequence[str] = ("hl7/", "engine/", "plugins/")) -> dict:
    """Read py-spy's raw (collapsed-stack) output, recorded with ``--threads``.

    Returns ``threads``: share of samples per thread name; ``inclusive``: the
    project's own functions (files under ``own``) by inclusive share; ``self``:
    any function by self share. Shares are percentages of all samples; line
    numbers are dropped so a function counts once."""
    line_number = re.compile(r":\d+\)$")
    thread_counts: dict[str, int] = {}
    self_counts: dict[str, int] = {}
    incl_counts: dict[str, int] = {}
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        try:
            count = int(count_text)
        except ValueError:
            continue
        frames = [f for f in stack.split(";") if f]
        if not frames:
            continue
        thread = frames[0]
        if thread.startswith("thread ("):
            thread = re.sub(r"^thread \(\d+\):?\s*", "", thread) or "?"
            frames = frames[1:]
        total += count
        thread_counts[thread] = thread_counts.get(thread, 0) + count
        frames = [line_number.sub(")", f) for f in frames]
        if frames:
            self_counts[frames[-1]] = self_counts.get(frames[-1], 0) + count
        for name in set(frames):
            if any(f"({prefix}" in name for prefix in own):
                incl_counts[name] = incl_counts.get(name, 0) + count
    if not total:
        return {"samples": 0, "threads": {}, "inclusive": [], "self": []}

    def share(counts: dict[str, int], n: int) -> list[tuple[str, float]]:
        return [(name, round(100 * c / total, 1)) for name, c in sorted(counts.items(), key=lambda kv: -kv[1])[:n]]

    return {"samples": total, "threads": dict(share(thread_counts, 10)), "inclusive": share(incl_counts, top),
            "self": share(self_counts, max(10, top // 2))}
