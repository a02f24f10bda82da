"""The processor in a process of its own.

One Python process runs one thread at a time.  With the processor in the
daemon's process, every acknowledgement waited for the GIL behind the batch
being applied, and applying shared one core with receiving, the HTTP endpoint,
the outbound feeds and the timed jobs.  The daemon therefore starts the
processor, with the plugins' after-commit notices, in a child process:
receiving and applying run on two cores, and they meet only in the database
(on SQLite: the child reads the inbox, never writes it; see ``hl7.store``).

Over one pipe the parent tells the child that messages wait, to reload plugin
settings and to stop; the child tells the parent the outcomes (for
"applied" acknowledgements), that the outbox has work, and every half second
its last error and its metrics, which the parent's ``/metrics`` and console
show merged with its own.  The child stops when the parent asks or when the
pipe breaks (the parent died): it finishes the batch in flight, which either
commits whole or not at all.  If the child dies, the parent starts another.
"""
from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import threading
import time
from typing import Any, Callable, Optional

from engine.metrics import Metrics

log = logging.getLogger("slotengine.applier")

STATE_EVERY_SECONDS = 0.5
#: added to the applier process's niceness: see ``run_child``
APPLIER_NICENESS = 5
#: A child that dies again and again is restarted ever later, up to this.
MAX_RESTART_SECONDS = 30.0


class ApplierFailed(Exception):
    """The child could not start (the message says why: database, plugins, configuration)."""


class ApplierProcess:
    def __init__(self, config, *, on_outcomes: Callable[[list], None], wake_outbound: Callable[[], None],
                 new_messages: threading.Event):
        self.config = config
        self.on_outcomes = on_outcomes
        self.wake_outbound = wake_outbound
        self.new_messages = new_messages
        self.last_error: Optional[str] = None
        self.stuck_calls: list[dict] = []  # the child's plugin calls running too long (PluginHost.stuck_calls)
        self._families: list = []
        self._stopping = threading.Event()
        self._send_lock = threading.Lock()
        self._ready = threading.Event()
        self._startup_error: Optional[str] = None
        self._restart_after = 1.0
        self._process = None
        self._conn = None
        self._idle = None

    # --- parent side -----------------------------------------------------------

    def start(self, timeout: float = 60.0) -> None:
        """Start the child and wait until it applies; ``ApplierFailed`` says why it could not."""
        self._spawn()
        if not self._ready.wait(timeout) or self._startup_error:
            self._stopping.set()
            reason = self._startup_error or f"not ready within {timeout:.0f} s"
            self.stop(5.0)
            raise ApplierFailed(f"the applier process could not start: {reason}")
        threading.Thread(target=self._forward_wakes, name="applier-wake", daemon=True).start()

    def _spawn(self) -> None:
        context = multiprocessing.get_context("spawn")  # a clean interpreter: no locks or threads copied by fork
        parent_end, child_end = context.Pipe()
        # 1 while the child's processor waits for messages: only then is a wake worth sending
        self._idle = context.RawValue("b", 0)
        self._process = context.Process(target=run_child, args=(self.config, child_end, self._idle),
                                        name="slotengine-applier")
        self._process.start()
        child_end.close()
        self._conn = parent_end
        threading.Thread(target=self._read, args=(parent_end, self._process), name="applier-read",
                         daemon=True).start()

    def _read(self, conn, process) -> None:
        while True:
            try:
                kind, payload = conn.recv()
            except (EOFError, OSError):
                break
            if kind == "outcomes":
                self.on_outcomes(payload)
            elif kind == "outbound":
                self.wake_outbound()
            elif kind == "state":
                self.last_error, self.stuck_calls, self._families = payload
            elif kind == "ready":
                self._ready.set()
                self._restart_after = 1.0
            elif kind == "failed":
                self.last_error = self._startup_error = payload
                self._ready.set()
        process.join()
        if self._stopping.is_set():
            return
        self.last_error = f"applier process exited with code {process.exitcode}; restarting"
        log.error("applier process exited; restarting", extra={"exit_code": process.exitcode,
                                                                 "restart_in_seconds": self._restart_after})
        if not self._stopping.wait(self._restart_after):
            self._restart_after = min(self._restart_after * 2, MAX_RESTART_SECONDS)
            self._spawn()

    def _forward_wakes(self) -> None:
        while not self._stopping.is_set():
            if self.new_messages.wait(0.5):
                self.new_messages.clear()
                if self._idle.value:  # a busy child finds the new messages by itself, untold
                    self._idle.value = 0
                    self._send("wake", None)

    def _send(self, kind: str, payload: Any) -> None:
        with self._send_lock:
            try:
                self._conn.send((kind, payload))
            except (OSError, ValueError):  # the child is gone: _read restarts it
                pass

    def reload(self, log_level: str, plugin_settings: dict) -> None:
        self._send("reload", (log_level, plugin_settings))

    def families(self) -> list:
        """The child's metric families as last reported."""
        return self._families

    def alive(self) -> bool:
        return self._process is not None and self._process.is_alive()

    def stop(self, timeout: float) -> None:
        """The child finishes its batch, moves what the inbox still holds, and exits."""
        self._stopping.set()
        self._send("stop", timeout)
        process = self._process
        if process is None:
            return
        process.join(timeout + 5)
        if process.is_alive():
            log.error("applier process did not stop in time; killed")
            process.kill()
            process.join()


# --- child side ------------------------------------------------------------------


def run_child(config, conn, idle) -> None:
    """The child's main: everything the processor needs, built as the daemon builds it."""
    # The parent decides when to stop (SIGTERM to the whole service reaches us too).
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)
    # When both want the same core, receiving (whose ACKs a sender waits for) goes first:
    # applying only catches up a little later
    os.nice(APPLIER_NICENESS)
    from hl7.logs import configure_logging

    configure_logging(config.logging.level, redaction_key=config.logging.read_redaction_key())
    channel = _Channel(conn)
    try:
        runtime = _ChildRuntime(config, channel, idle)
    except Exception as exc:  # noqa: BLE001 - told to the parent, which logs and retries
        log.error("applier process could not start", exc_info=True)
        channel.send("failed", f"{type(exc).__name__}: {exc}".splitlines()[0][:300])
        return
    channel.send("ready", None)
    runtime.serve(conn)


class _Channel:
    def __init__(self, conn):
        self.conn = conn
        self.lock = threading.Lock()

    def send(self, kind: str, payload: Any) -> None:
        with self.lock:
            try:
                self.conn.send((kind, payload))
            except (OSError, ValueError):  # the parent is gone; serve() notices and stops
                pass


class _ChildRuntime:
    def __init__(self, config, channel: _Channel, idle):
        from engine.clock import SystemClock
        from engine.db import make_engine, make_session_factory
        from engine.jobs import make_context
        from engine.service import Scheduler
        from hl7.daemon import build_plugins, engine_settings, feed_policies
        from hl7.outbound import OutboundSettings
        from hl7.processor import Processor
        from hl7.store import Inbox, MessageStore

        self.channel = channel
        self.metrics = Metrics()
        self.engine = make_engine(config.database.url, pool_size=config.database.pool_size)
        sessions = make_session_factory(self.engine)
        outbound_settings = OutboundSettings(default_timezone=config.clinic.timezone)
        self.plugins, outbound, mirror_requests = build_plugins(config, outbound_settings, self.metrics)
        scheduler = Scheduler(sessions, plugins=self.plugins, clock=SystemClock(), settings=engine_settings(config))
        self.context = make_context(scheduler, plugin_settings=config.plugins.settings, metrics=self.metrics)
        self.plugins.notify_in_background()
        outbound.notify = mirror_requests.notify = lambda *_args: channel.send("outbound", None)
        self.store = MessageStore(sessions, self.metrics, Inbox.for_database(config.database.url, writer=False))
        self.processor = Processor(scheduler, self.store, feed_policies(config, outbound_settings), self.metrics,
                                   on_outcomes=lambda outcomes: channel.send("outcomes", outcomes), idle=idle)
        self.processor.start()

    def serve(self, conn) -> None:
        grace = 10.0
        reported = 0.0
        while True:
            try:
                if conn.poll(STATE_EVERY_SECONDS):
                    kind, payload = conn.recv()
                    if kind == "wake":
                        self.store.new_messages.set()
                    elif kind == "reload":
                        self._reload(payload)
                    elif kind == "stop":
                        grace = payload
                        break
            except (EOFError, OSError):
                log.warning("the daemon is gone; applier process stopping")
                break
            if time.monotonic() - reported >= STATE_EVERY_SECONDS:
                reported = time.monotonic()
                self._report()
        self.processor.stop(grace)
        self.plugins.stop_notifications(1.0)
        self._report()
        if self.store.inbox is not None:
            self.store.inbox.close()
        self.engine.dispose()

    def _reload(self, settings: tuple[str, dict]) -> None:
        from hl7.logs import set_level

        log_level, plugin_settings = settings
        set_level(log_level)
        try:
            self.plugins.configure(plugin_settings, self.context)
        except Exception as exc:  # noqa: BLE001 - keep the old settings
            log.error("plugin settings not reloaded", extra={"error": str(exc)[:500]})

    def _report(self) -> None:
        self.channel.send("state", (self.processor.last_error, self.plugins.stuck_calls(),
                                    list(self.metrics.registry.collect())))
