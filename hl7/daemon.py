"""``slotengine serve``: the whole daemon in one asyncio program.

start-up → serve until SIGTERM/SIGINT → drain → exit 0.  The shape follows
uvicorn's ``Server.serve``: signal handlers first, then everything that can
fail (configuration, schema, plugins, sockets) before "ready", then a main
loop that only waits, then an orderly shutdown.  A second SIGTERM forces the
exit.  SIGHUP reloads what can change without dropping connections: log
level, plugin settings, TLS certificates.
"""
from __future__ import annotations

import asyncio
import gc
import logging
import signal
import sys
import time
from contextlib import contextmanager
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Iterator, Optional

from prometheus_client import generate_latest
from sqlalchemy import func, select, text

from engine.clinic import load_clinic
from engine.clock import SystemClock
from engine.db import make_engine, make_session_factory
from engine.errors import SchedulingError
from engine.jobs import build_job_scheduler, make_context
from engine.metrics import CombinedRegistry, Metrics
from engine.models import InboundMessage
from engine.plugin_host import PluginHost
from engine.schema import SchemaOutOfDate, current_revision, ensure_current, upgrade
from engine.service import EngineSettings, Scheduler
from hl7.applier import ApplierFailed, ApplierProcess
from hl7.config import Config, load_config
from hl7.filler import FillerSettings
from hl7.httpd import HttpEndpoint
from hl7.listener import Listener, OutcomeWaiters, feed_runtime
from hl7.logs import configure_logging, set_level
from hl7.mirror import MirrorRequests, request_owners
from hl7.outbound import OutboundDispatcher, OutboundSettings, OutboundSIU
from hl7.processor import FeedPolicy
from hl7.store import RECEIVED, GroupCommitter, Inbox, MessageStore

log = logging.getLogger("slotengine.daemon")


class StartupError(Exception):
    """Start-up cannot continue; the message says why and what to do."""


def engine_settings(config: Config) -> EngineSettings:
    clinic = config.clinic
    return EngineSettings(
        emergency_release=timedelta(minutes=clinic.emergency_release_minutes),
        no_show_grace=timedelta(minutes=clinic.no_show_grace_minutes),
        hold_duration=timedelta(minutes=clinic.hold_minutes),
        owner_answer_timeout=timedelta(minutes=clinic.owner_answer_minutes),
        default_timezone=clinic.timezone,
    )


def feed_policies(config: Config, outbound_settings: OutboundSettings) -> dict[str, FeedPolicy]:
    filler = FillerSettings(outbound=outbound_settings)
    return {feed.name: FeedPolicy(feed.mode, feed.on_error, feed.ack_when, filler) for feed in config.feeds}


def build_plugins(config: Config, outbound_settings: OutboundSettings,
                  metrics: Optional[Metrics] = None) -> tuple[PluginHost, OutboundSIU, MirrorRequests]:
    """The plugins as the daemon runs them: the built-ins and installed ones, the
    outbound SIU feed, and mirror mode's requests to the EHR. The CLI uses the same,
    so a change made from the command line is announced or asked exactly alike."""
    owners = request_owners(config.feeds, config.destinations)
    # the EHR hears of its own calendars through our requests (SRM), never through SIU
    subscribers = [d for d in config.destinations if d not in owners]
    outbound = OutboundSIU(subscribers, outbound_settings)
    mirror_requests = MirrorRequests(owners, outbound_settings)
    extra = [("outbound_siu", outbound)] if subscribers else []
    if owners:
        extra.append(("mirror_requests", mirror_requests))
    host = PluginHost(disabled=config.plugins.disabled, metrics=metrics, extra=extra)
    return host, outbound, mirror_requests


STARTUP_LOCK = 0x510_7E61  # PostgreSQL advisory lock: one node migrates and loads the clinic at a time


@contextmanager
def exclusive_startup(engine) -> Iterator[None]:
    """Serialise start-up work between daemons sharing one PostgreSQL database
    (SQLite's single writer already does)."""
    if engine.dialect.name != "postgresql":
        yield
        return
    with engine.connect() as connection:
        connection.execute(text("SELECT pg_advisory_lock(:key)"), {"key": STARTUP_LOCK})
        connection.commit()
        try:
            yield
        finally:
            connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": STARTUP_LOCK})
            connection.commit()


def prepare_database(url: str, pool_size: int = 5, clinic_data: Optional[Path] = None):
    """Open the database; create the schema in an empty one, refuse an old one;
    load the clinic's calendars."""
    engine = make_engine(url, pool_size=pool_size)
    try:
        with exclusive_startup(engine):
            if current_revision(engine) is None:
                with engine.connect() as connection:
                    has_tables = engine.dialect.has_table(connection, "appointments")
                if has_tables:
                    raise SchemaOutOfDate(None, "head")
                upgrade(engine)
            ensure_current(engine)
            if clinic_data:
                with make_session_factory(engine)() as session, session.begin():
                    counts = load_clinic(session, clinic_data)
                log.info("clinic data loaded", extra=counts)
    except SchemaOutOfDate as exc:
        engine.dispose()
        raise StartupError(str(exc)) from None
    except (StartupError, SchedulingError):
        engine.dispose()
        raise
    except Exception as exc:
        engine.dispose()
        raise StartupError(f"cannot open the database: {type(exc).__name__}: {exc}".splitlines()[0]) from None
    return engine


class Daemon:
    def __init__(self, config: Config):
        self.config = config
        self.metrics = Metrics()
        self.clock = SystemClock()
        self.listeners: list[Listener] = []
        self.stopping = asyncio.Event()
        self.forced = False
        self.started_at = time.monotonic()

    # --- start-up ----------------------------------------------------------------

    def _start_engine(self) -> None:
        config = self.config
        self.engine = prepare_database(config.database.url, config.database.pool_size, config.clinic.data)
        self.sessions = make_session_factory(self.engine)
        self.outbound_settings = OutboundSettings(default_timezone=config.clinic.timezone)
        self.plugins, self.outbound, self.mirror_requests = build_plugins(config, self.outbound_settings, self.metrics)
        self.scheduler = Scheduler(self.sessions, plugins=self.plugins, clock=self.clock,
                                   settings=engine_settings(config))
        self.context = make_context(self.scheduler, plugin_settings=config.plugins.settings, metrics=self.metrics)
        self.plugins.notify_in_background()
        self.store = MessageStore(self.sessions, self.metrics, Inbox.for_database(config.database.url))

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self._start_engine)
        self.committer = GroupCommitter(self.store)
        self.committer.start()
        self.waiters = OutcomeWaiters(loop)
        self.applier = ApplierProcess(self.config, on_outcomes=self.waiters.resolve_threadsafe,
                                      wake_outbound=lambda: self.dispatcher.wake(),
                                      new_messages=self.store.new_messages)
        self.metrics.exposed = CombinedRegistry(self.metrics.registry, self.applier.families)
        self.dispatcher = OutboundDispatcher(self.sessions, self.config.destinations,
                                             settings=self.outbound_settings, clock=self.clock, metrics=self.metrics,
                                             scheduler=self.scheduler)
        self.outbound.notify = self.mirror_requests.notify = self.dispatcher.wake
        self.dispatcher_task = loop.create_task(self.dispatcher.run(), name="outbound")
        try:
            await loop.run_in_executor(None, self.applier.start)
        except ApplierFailed as exc:
            raise StartupError(str(exc)) from None
        for feed in self.config.feeds:
            listener = Listener(feed_runtime(feed), self.committer, self.store, self.waiters, self.metrics, self.clock)
            await listener.start()
            self.listeners.append(listener)
        http = self.config.http
        token = http.read_token()
        self.http = HttpEndpoint(http.listen.host, http.listen.port, token=token.decode() if token else None, health=self.health,
                                 metrics=lambda: generate_latest(self.metrics.exposed))
        for method, path, handler, _plugin in self.plugins.http_routes():
            self.http.add_route(method, path, handler)
        self.console = self._console() if self.config.console.enabled else None
        if self.console is not None:
            self.http.mount("/console", self.console)
        await self.http.start()
        self.jobs = build_job_scheduler(self.context, self.plugins)
        self.jobs.start()
        # Modules, plugins, hl7apy's tables and the clinic live until exit: out of the
        # collector's sight, a full collection no longer walks them (about 70 ms with
        # every thread stopped, an ACK included).
        gc.freeze()
        log.info("ready", extra={"feeds": [f"{l.feed.name}@{l.feed.listen.host}:{l.bound_port}" for l in self.listeners],
                                 "http": str(http.listen)})

    def _console(self):
        from hl7.console.app import ConsoleApp, ConsoleRuntime

        runtime = ConsoleRuntime(
            config=self.config, sessions=self.sessions, clock=self.clock, plugins=self.plugins, metrics=self.metrics,
            started_at=self.clock.now(),
            feed_activity=lambda now: {l.feed.name: l.activity(now) for l in self.listeners},
            destination_status=self.dispatcher.status, job_rows=self._job_rows, stuck_calls=self.stuck_calls,
            wake_processor=self.store.new_messages.set, wake_dispatcher=self.dispatcher.wake)
        return ConsoleApp(runtime, redaction_key=self.config.logging.read_redaction_key())

    def _job_rows(self) -> list[dict[str, Any]]:
        """``slotengine jobs list`` rows with the live scheduler's next run times, as datetimes."""
        from engine.jobs import job_table

        next_runs = {job.id: job.next_run_time for job in self.jobs.get_jobs()}
        rows = job_table(self.sessions, self.plugins)
        for row in rows:
            for key in ("last_started_at", "last_finished_at"):
                row[key] = datetime.fromisoformat(row[key]) if row[key] else None
            row["next_run_at"] = next_runs.get(row["id"])
        return rows

    # --- health ------------------------------------------------------------------

    def stuck_calls(self) -> list[dict[str, Any]]:
        """Plugin calls running too long, here and in the applier process."""
        return self.plugins.stuck_calls() + self.applier.stuck_calls

    def health(self) -> tuple[bool, dict]:
        detail: dict[str, Any] = {"listeners": {l.feed.name: l.server is not None and l.server.is_serving()
                                                for l in self.listeners}}
        try:
            with self.sessions() as session:
                session.execute(text("SELECT 1"))
                depth = session.scalar(select(func.count()).select_from(InboundMessage)
                                       .where(InboundMessage.status == RECEIVED))
            detail["database"] = "ok"
            detail["queue_depth"] = depth + self.store.inbox_depth()
        except Exception as exc:  # noqa: BLE001 - reported, not raised
            detail["database"] = f"unavailable: {type(exc).__name__}"
        storage_ok = self.store.last_failure is None or self.store.probe()
        detail["storage"] = "ok" if storage_ok else f"failing: {self.store.last_failure}"
        detail["outbound"] = self.dispatcher.status()
        stuck = self.stuck_calls()
        if stuck:
            detail["stuck_plugins"] = stuck
        if self.applier.last_error:
            detail["processing"] = f"failing: {self.applier.last_error}"
        ok = detail["database"] == "ok" and storage_ok and all(detail["listeners"].values())
        detail["status"] = "ready" if ok else "unavailable"
        return ok, detail

    # --- signals -----------------------------------------------------------------

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self._on_stop_signal)
        loop.add_signal_handler(signal.SIGINT, self._on_stop_signal)
        loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(self.reload()))

    def _on_stop_signal(self) -> None:
        if self.stopping.is_set():
            self.forced = True
            log.warning("second stop signal: exiting now")
            raise SystemExit(1)
        log.info("stop requested; draining")
        self.stopping.set()

    async def reload(self) -> None:
        """SIGHUP: log level, plugin settings and TLS certificates, in place."""
        try:
            fresh = load_config(Path(self.config.source))
        except Exception as exc:  # noqa: BLE001 - keep running on the old configuration
            log.error("reload refused; configuration unchanged", extra={"error": str(exc)[:2000]})
            return
        set_level(fresh.logging.level)
        self.applier.reload(fresh.logging.level, fresh.plugins.settings)
        try:
            self.plugins.configure(fresh.plugins.settings, self.context)
        except Exception as exc:  # noqa: BLE001
            log.error("plugin settings not reloaded", extra={"error": str(exc)[:500]})
        by_name = {feed.name: feed for feed in fresh.feeds}
        for listener in self.listeners:
            feed = by_name.get(listener.feed.name)
            if feed is None or listener.runtime.ssl_context is None or feed.tls is None:
                continue
            try:
                listener.runtime.ssl_context.load_cert_chain(str(feed.tls.cert), str(feed.tls.key) if feed.tls.key else None)
                if feed.tls.client_ca:
                    listener.runtime.ssl_context.load_verify_locations(cafile=str(feed.tls.client_ca))
            except Exception as exc:  # noqa: BLE001
                log.error("TLS certificates not reloaded", extra={"feed": feed.name, "error": str(exc)[:300]})
        if self.console is not None:
            self.console.reconfigure(fresh.console)
        log.info("configuration reloaded")

    # --- shutdown ----------------------------------------------------------------

    async def shutdown(self) -> None:
        grace = self.config.shutdown.grace_seconds
        for listener in self.listeners:
            await listener.stop_accepting()
        await asyncio.gather(*(l.close_connections(grace) for l in self.listeners))
        await self.http.stop()
        try:
            self.jobs.shutdown(wait=False)
        except Exception:  # noqa: BLE001 - not started
            pass
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self.applier.stop, grace)
        await self.dispatcher.stop(grace)
        await self.dispatcher_task
        await loop.run_in_executor(None, self.plugins.stop_notifications, 1.0)
        await self.committer.stop()
        if self.store.inbox is not None:
            self.store.inbox.close()
        self.engine.dispose()
        log.info("stopped")


async def serve(config: Config) -> int:
    daemon = Daemon(config)
    daemon.install_signal_handlers()
    try:
        await daemon.start()
    except StartupError:
        raise
    await daemon.stopping.wait()
    await daemon.shutdown()
    return 0


def run(config: Config) -> int:
    # The listener's event loop shares the GIL with the store, dispatcher, job and
    # notifier threads; a short switch interval keeps ACKs from queueing behind them.
    sys.setswitchinterval(0.0005)
    configure_logging(config.logging.level, redaction_key=config.logging.read_redaction_key())
    return asyncio.run(serve(config))
