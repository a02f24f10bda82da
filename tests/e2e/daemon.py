"""Start and stop real ``slotengine serve`` processes for end-to-end tests."""
from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[2]


def stored_control_ids(database: Path, control_id: Optional[str] = None) -> set[str]:
    """Control ids of the messages a SQLite daemon has stored: in its inbox (not yet
    moved) or in the database.  The inbox is read first: a message leaves it only
    after the database has committed it."""
    from hl7.store import inbox_path

    found: set[str] = set()
    where, params = ("where control_id = ?", (control_id,)) if control_id else ("", ())
    inbox = inbox_path(database)
    if inbox.exists():
        with sqlite3.connect(inbox) as connection:
            found |= {row[0] for row in connection.execute(f"select control_id from inbox {where}", params)}
    with sqlite3.connect(database) as connection:
        found |= {row[0] for row in connection.execute(f"select control_id from inbound_messages {where}", params)}
    return found


def waiting_messages(database: Path) -> int:
    """Stored messages not applied yet: the inbox's and the database's ``received``."""
    from hl7.store import inbox_path

    inbox = inbox_path(database)
    with sqlite3.connect(database) as connection:
        moved_through = connection.execute("select coalesce(max(id), 0) from inbound_messages").fetchone()[0]
        waiting = connection.execute("select count(*) from inbound_messages where status = 'received'").fetchone()[0]
    if inbox.exists():  # rows up to the database's highest id have moved; the rest wait
        with sqlite3.connect(inbox) as connection:
            waiting += connection.execute("select count(*) from inbox where id > ?", (moved_through,)).fetchone()[0]
    return waiting


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class DaemonConfig:
    directory: Path
    database_url: str
    feeds: list[dict] = field(default_factory=lambda: [{"name": "ehr", "mode": "mirror"}])
    extra: str = ""
    plugins_disabled: tuple[str, ...] = ()
    clinic: bool = True
    log_level: str = "INFO"

    def write(self) -> Path:
        """Write the file once; a restarted daemon reuses it (and its ports)."""
        if getattr(self, "path", None):
            return self.path
        self.http_port = free_port()
        lines = [
            "[database]", f'url = "{self.database_url}"', "",
            "[clinic]", f'data = "{REPO / "config" / "demo-clinic.toml"}"' if self.clinic else "",
            'timezone = "America/New_York"', "",
            "[logging]", f'level = "{self.log_level}"', "",
            "[http]", f'listen = "127.0.0.1:{self.http_port}"', "",
            "[shutdown]", "grace_seconds = 5", "",
            "[plugins]", f"disabled = {json.dumps(list(self.plugins_disabled))}", "",
        ]
        for feed in self.feeds:
            feed.setdefault("port", free_port())
            lines += ["[[feeds]]"]
            for key, value in feed.items():
                if key == "port":
                    continue
                lines.append(f"{key} = {json.dumps(value)}")
            lines.append(f'listen = "127.0.0.1:{feed["port"]}"')
            lines.append("")
        self.path = self.directory / "slotengine.toml"
        self.path.write_text("\n".join(lines) + "\n" + self.extra)
        return self.path


class DaemonProcess:
    def __init__(self, config: DaemonConfig, *, env: Optional[dict] = None):
        self.config = config
        self.config_path = config.write()
        self.log_path = config.directory / f"daemon-{int(time.time() * 1000)}.log"
        self.env = {**os.environ, **(env or {})}
        self.proc: Optional[subprocess.Popen] = None

    def port(self, feed: str = "ehr") -> int:
        return next(f["port"] for f in self.config.feeds if f["name"] == feed)

    def start(self, timeout: float = 30.0) -> "DaemonProcess":
        self.log_file = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "hl7.cli", "serve", "--config", str(self.config_path)],
            stdout=self.log_file, stderr=subprocess.STDOUT, env=self.env, cwd=self.config.directory,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited with {self.proc.returncode}:\n{self.log_path.read_text()[-4000:]}")
            try:
                if self.health()[0] == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"daemon not ready:\n{self.log_path.read_text()[-4000:]}")

    def health(self) -> tuple[int, dict]:
        url = f"http://127.0.0.1:{self.config.http_port}/healthz"
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"{}")

    def metrics(self) -> str:
        url = f"http://127.0.0.1:{self.config.http_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.read().decode()

    def terminate(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            self.log_file.close()

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()
        self.log_file.close()

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            try:
                self.terminate(15)
            except subprocess.TimeoutExpired:
                self.kill()
