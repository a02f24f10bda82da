"""Timed work: one APScheduler 3.x ``AsyncIOScheduler`` per daemon, and the sweep helpers jobs share.

A job is a sweep: it claims due rows from the database (``claim_due``), acts,
and marks them done in the same transaction as its effects.  The database is
the source of truth, so the scheduler keeps its jobs in memory
(``MemoryJobStore``: APScheduler's FAQ says a job store must never be shared
between schedulers) and re-registers them with fixed ids at every start; a
restart loses nothing, and several daemons on one PostgreSQL never claim the
same row (``FOR UPDATE SKIP LOCKED``).  On SQLite every write transaction
starts with ``BEGIN IMMEDIATE`` (``engine.db``), so the single writer lock is
held from the claim to the commit.

Effects inside the database (an offer expiring, coverage re-checked) happen
exactly once.  Messages that leave the building (e-mail, SMS) are sent while
the claim is held and marked sent in the same commit; a crash between the
remote server's acceptance and our commit sends that batch again on restart
(at least once), so every message carries a stable id (``outbox-<id>``) for
the receiver to drop duplicates.

The daemon wires it up as::

    context = make_context(scheduler, plugin_settings=config["plugins"])
    jobs = build_job_scheduler(context, context.plugins)
    jobs.start()                     # inside the running asyncio loop
    ...
    jobs.shutdown(wait=True)         # on SIGTERM, after the listeners stop
"""
from __future__ import annotations

import asyncio
import functools
import inspect
import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Callable, Iterable, Optional, Sequence

from apscheduler.executors.asyncio import AsyncIOExecutor
from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.jobstores.memory import MemoryJobStore
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger
from sqlalchemy import bindparam, false, insert, or_, select, update
from sqlalchemy.dialects import postgresql as pg_dialect
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from engine.clock import Clock
from engine.db import Direct, reading
from engine.metrics import Metrics
from engine.models import JobRun, OutboxItem, PluginTask
from engine.plugin_host import JobRegistration, PluginError, PluginHost
from engine.service import Scheduler

log = logging.getLogger("slotengine.jobs")


# --- the context every job and hook receives ----------------------------------------


@dataclass
class JobContext:
    """What a job (and every hook, as ``context``) can use.

    ``settings`` holds every plugin's configuration section by plugin name;
    ``state`` is where plugins keep what they parsed, under their own name;
    ``channels`` are the message channels by name (``slotengine_register_channels``).
    """

    scheduler: Scheduler
    session_factory: sessionmaker
    clock: Clock
    plugins: PluginHost
    metrics: Metrics
    channels: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, dict[str, Any]] = field(default_factory=dict)
    state: dict[str, Any] = field(default_factory=dict)

    def now(self) -> datetime:
        return self.clock.now()


def make_context(scheduler: Scheduler, *, plugin_settings: Optional[dict[str, dict[str, Any]]] = None,
                 metrics: Optional[Metrics] = None) -> JobContext:
    """Build the context, configure every plugin with its section, collect channels.

    Raises ``PluginError`` (naming the plugin) when a plugin refuses its settings
    or fails to register its channels: start-up should stop."""
    plugins = scheduler.plugins
    context = JobContext(
        scheduler=scheduler,
        session_factory=scheduler.sessions,
        clock=scheduler.clock,
        plugins=plugins,
        metrics=metrics or plugins.metrics,
        settings={name: dict(section or {}) for name, section in (plugin_settings or {}).items()},
    )
    plugins.configure(context.settings, context)
    context.channels.update(plugins.channels())
    return context


# --- core jobs -------------------------------------------------------------------------


@dataclass(frozen=True)
class JobSettings:
    """The ``[jobs]`` section: core job timing and the scheduler's defaults."""

    slot_horizon_days: int = 56
    slot_generation_cron: dict[str, Any] = field(default_factory=lambda: {"hour": 2, "minute": 15})
    hold_expiry_seconds: float = 30.0
    misfire_grace_time: int = 60
    max_workers: int = 4
    timezone: str = "UTC"

    @classmethod
    def from_dict(cls, data: Optional[dict[str, Any]]) -> "JobSettings":
        data = dict(data or {})
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"[jobs]: unknown settings {', '.join(sorted(unknown))}")
        return cls(**data)


def generate_slots(context: JobContext) -> str:
    """Rolling slot generation: expand every template over the horizon (idempotent)."""
    horizon = context.state.get("core.jobs", JobSettings()).slot_horizon_days
    today = context.clock.now().date()
    try:
        created = context.scheduler.expand_templates(today, today + timedelta(days=horizon))
    except IntegrityError:
        # another daemon expanded the same days at the same moment; its slots stand
        return "raced with another daemon"
    return f"{created} slots created"


def release_expired_holds(context: JobContext) -> str:
    return f"{context.scheduler.release_expired_holds()} holds released"


def core_jobs(settings: JobSettings) -> list[JobRegistration]:
    return [
        JobRegistration("core", "core.generate_slots", generate_slots, cron=dict(settings.slot_generation_cron),
                        at_start=True, misfire_grace_time=3600),
        JobRegistration("core", "core.release_expired_holds", release_expired_holds,
                        seconds=settings.hold_expiry_seconds, at_start=True),
    ]


def collect_jobs(context: JobContext, settings: Optional[JobSettings] = None) -> list[JobRegistration]:
    """Core jobs and every plugin's jobs, ids unique."""
    settings = settings or context.state.get("core.jobs") or JobSettings()
    jobs = core_jobs(settings)
    taken = {job.job_id for job in jobs}
    for job in context.plugins.job_registrations():
        if job.job_id in taken:
            raise PluginError(f"plugin {job.plugin!r} registered job {job.job_id!r}, a core job id", job.plugin)
        jobs.append(job)
    return jobs


# --- running one job ---------------------------------------------------------------------


def _upsert_job_run(session: Session, job_id: str) -> JobRun:
    run = session.get(JobRun, job_id, with_for_update=True)
    if run is None:
        module = pg_dialect if session.get_bind().dialect.name == "postgresql" else sqlite_dialect
        session.execute(module.insert(JobRun).values(job_id=job_id, last_outcome="", runs=0)
                        .on_conflict_do_nothing())
        run = session.get(JobRun, job_id, with_for_update=True, populate_existing=True)
    return run


def _job_started(context: JobContext, job_id: str) -> None:
    with context.session_factory() as session, session.begin():
        run = _upsert_job_run(session, job_id)
        run.last_started_at = context.clock.now()
        run.runs = (run.runs or 0) + 1


def _job_finished(context: JobContext, job_id: str, outcome: str) -> None:
    with context.session_factory() as session, session.begin():
        run = _upsert_job_run(session, job_id)
        run.last_finished_at = context.clock.now()
        run.last_outcome = outcome[:2000]


def _outcome_of(result: Any) -> str:
    return "ok" if result is None else f"ok: {result}"


def run_job(context: JobContext, job: JobRegistration) -> str:
    """Run a job once as the scheduler does: JobRun row, metrics, errors logged (never raised)."""
    try:
        _job_started(context, job.job_id)
    except Exception:  # noqa: BLE001 - bookkeeping must not stop the job
        log.exception("could not record job start", extra={"job": job.job_id})
    try:
        outcome = _outcome_of(job.func(context))
        label = "ok"
    except Exception as exc:  # noqa: BLE001 - recorded and retried at the next run
        log.exception("job failed", extra={"job": job.job_id, "plugin": job.plugin})
        outcome, label = f"error: {type(exc).__name__}: {exc}", "error"
    return _finish(context, job, outcome, label)


async def run_job_async(context: JobContext, job: JobRegistration) -> str:
    await asyncio.to_thread(_job_started, context, job.job_id)
    try:
        outcome = _outcome_of(await job.func(context))
        label = "ok"
    except Exception as exc:  # noqa: BLE001
        log.exception("job failed", extra={"job": job.job_id, "plugin": job.plugin})
        outcome, label = f"error: {type(exc).__name__}: {exc}", "error"
    return await asyncio.to_thread(_finish, context, job, outcome, label)


def _finish(context: JobContext, job: JobRegistration, outcome: str, label: str) -> str:
    context.metrics.job_runs.labels(job.job_id, label).inc()
    try:
        _job_finished(context, job.job_id, outcome)
    except Exception:  # noqa: BLE001
        log.exception("could not record job outcome", extra={"job": job.job_id})
    return outcome


# --- the scheduler -------------------------------------------------------------------------


class JobScheduler(AsyncIOScheduler):
    """An ``AsyncIOScheduler`` that remembers its context and registrations (for ``list_jobs``)."""

    context: JobContext
    registrations: dict[str, JobRegistration]


def _trigger(job: JobRegistration, settings: JobSettings):
    if job.cron is not None:
        # a job may name its own zone (a daily run at clinic-local time, whatever DST says)
        return CronTrigger(**{"timezone": settings.timezone, **job.cron})
    return IntervalTrigger(seconds=job.seconds, timezone=settings.timezone)


def build_job_scheduler(context: JobContext, plugins: Optional[PluginHost] = None, *,
                        settings: Optional[JobSettings] = None) -> JobScheduler:
    """One scheduler per daemon with the core jobs and every plugin's jobs.

    Fixed ids, ``replace_existing=True``, ``coalesce=True`` (a backlog of missed
    runs is one run), ``max_instances=1`` (a slow sweep is not overtaken by
    itself), ``misfire_grace_time`` 60 s (an hour for the daily slot
    generation).  Sync jobs run in a thread pool; coroutine jobs on the loop.
    Call ``start()`` from inside the running event loop."""
    if plugins is not None and plugins is not context.plugins:
        raise ValueError("build_job_scheduler: plugins must be the context's plugin host")
    settings = settings or context.state.get("core.jobs") or JobSettings()
    context.state["core.jobs"] = settings
    scheduler = JobScheduler(
        jobstores={"default": MemoryJobStore()},
        executors={"default": ThreadPoolExecutor(settings.max_workers), "asyncio": AsyncIOExecutor()},
        job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": settings.misfire_grace_time},
        timezone=settings.timezone,
    )
    scheduler.context = context
    scheduler.registrations = {}
    for job in collect_jobs(context, settings):
        is_async = inspect.iscoroutinefunction(job.func)
        options: dict[str, Any] = {}
        if job.at_start:
            options["next_run_time"] = datetime.now(timezone.utc)
        scheduler.add_job(
            run_job_async if is_async else run_job,
            trigger=_trigger(job, settings),
            args=[context, job],
            id=job.job_id,
            name=f"{job.plugin}:{job.job_id}",
            executor="asyncio" if is_async else "default",
            replace_existing=True,
            coalesce=True,
            max_instances=1,
            misfire_grace_time=job.misfire_grace_time or settings.misfire_grace_time,
            **options,
        )
        scheduler.registrations[job.job_id] = job
    return scheduler


# --- listing (``slotengine jobs list``) ----------------------------------------------------


@dataclass(frozen=True)
class JobRow:
    job_id: str
    plugin: str
    trigger: str
    next_run: Optional[datetime]
    last_started: Optional[datetime]
    last_finished: Optional[datetime]
    last_outcome: str
    runs: int

    def as_row(self) -> dict[str, Any]:
        return {
            "id": self.job_id, "plugin": self.plugin, "trigger": self.trigger,
            "next_run": self.next_run.isoformat() if self.next_run else None,
            "last_started": self.last_started.isoformat() if self.last_started else None,
            "last_finished": self.last_finished.isoformat() if self.last_finished else None,
            "last_outcome": self.last_outcome, "runs": self.runs,
        }


def _describe(job: JobRegistration) -> str:
    return f"cron {job.cron}" if job.cron is not None else f"every {job.seconds:g}s"


def _job_runs(session_factory: sessionmaker) -> dict[str, JobRun]:
    with session_factory() as session:
        return {run.job_id: run for run in session.scalars(select(JobRun))}


def list_jobs(scheduler: JobScheduler) -> list[JobRow]:
    """Rows for a running daemon: each registered job, its next run, its last outcome (from ``job_runs``)."""
    runs = _job_runs(scheduler.context.session_factory)
    rows = []
    for job in scheduler.get_jobs():
        registration = scheduler.registrations.get(job.id)
        run = runs.get(job.id)
        rows.append(JobRow(
            job.id, registration.plugin if registration else "?",
            _describe(registration) if registration else str(job.trigger),
            getattr(job, "next_run_time", None),
            run.last_started_at if run else None, run.last_finished_at if run else None,
            run.last_outcome if run else "", run.runs if run else 0,
        ))
    return sorted(rows, key=lambda r: r.job_id)


def list_job_records(context: JobContext, settings: Optional[JobSettings] = None) -> list[JobRow]:
    """Rows without a running daemon: the job ids this configuration registers,
    and every ``job_runs`` row in the database (jobs no longer registered show
    plugin ``?``).  ``next_run`` is None."""
    registered = {job.job_id: job for job in collect_jobs(context, settings)}
    runs = _job_runs(context.session_factory)
    rows = []
    for job_id in sorted(set(registered) | set(runs)):
        job, run = registered.get(job_id), runs.get(job_id)
        rows.append(JobRow(
            job_id, job.plugin if job else "?", _describe(job) if job else "(not registered)", None,
            run.last_started_at if run else None, run.last_finished_at if run else None,
            run.last_outcome if run else "", run.runs if run else 0,
        ))
    return rows


def job_table(session_factory: sessionmaker, plugins: PluginHost,
              settings: Optional[JobSettings] = None) -> list[dict[str, Any]]:
    """``slotengine jobs list`` without a daemon and without configuring plugins: the
    job ids the core and the plugins register (plugins see ``context=None`` and use
    their defaults), merged with every ``job_runs`` row.  Keys: ``id``, ``plugin``,
    ``every_seconds`` (None for cron jobs), ``trigger``, ``last_started_at``,
    ``last_finished_at``, ``last_outcome``, ``runs``."""
    registered = {job.job_id: job for job in core_jobs(settings or JobSettings())}
    for job in plugins.job_registrations():
        registered.setdefault(job.job_id, job)
    runs = _job_runs(session_factory)
    rows = []
    for job_id in sorted(set(registered) | set(runs)):
        job, run = registered.get(job_id), runs.get(job_id)
        rows.append({
            "id": job_id, "plugin": job.plugin if job else "?",
            "every_seconds": job.seconds if job else None,
            "trigger": _describe(job) if job else "(not registered)",
            "last_started_at": run.last_started_at.isoformat() if run and run.last_started_at else None,
            "last_finished_at": run.last_finished_at.isoformat() if run and run.last_finished_at else None,
            "last_outcome": run.last_outcome if run else "", "runs": run.runs if run else 0,
        })
    return rows


# --- sweep helpers ---------------------------------------------------------------------------


def claim_due(session: Session, model: type, due_column: Any, batch_size: int, now: datetime,
              extra_filter: Any = None) -> list[Any]:
    """Claim up to ``batch_size`` rows of ``model`` whose ``due_column`` is at or before ``now``.

    On PostgreSQL the rows are locked ``FOR UPDATE SKIP LOCKED``: another
    daemon's claim in flight skips them and takes the next ones.  On SQLite the
    transaction holds the single writer lock from its ``BEGIN IMMEDIATE``, so a
    second claimer waits until this one commits and then sees the rows done.
    Call it inside ``session.begin()`` and mark the rows done before commit.
    ``extra_filter`` is a clause or a sequence of clauses (e.g. ``status == 'pending'``).
    """
    if not session.in_transaction():
        raise RuntimeError("claim_due must run inside a transaction (session.begin())")
    clauses = [due_column <= now]
    if extra_filter is not None:
        clauses.extend(extra_filter if isinstance(extra_filter, (list, tuple)) else [extra_filter])
    primary_key = model.__mapper__.primary_key
    stmt = select(model).where(*clauses).order_by(due_column, *primary_key).limit(batch_size)
    if session.get_bind().dialect.name == "postgresql":
        stmt = stmt.with_for_update(skip_locked=True, of=model)
    return list(session.scalars(stmt))


# Built once, Core where the ORM adds only cost: every booking plans and withdraws tasks
_TASKS = PluginTask.__table__
_PLAN = Direct(insert(_TASKS))
_PLAN_ONCE = {  # RETURNING, not rowcount: psycopg reports -1 for INSERT … ON CONFLICT DO NOTHING
    name: Direct(module.insert(_TASKS).on_conflict_do_nothing(index_elements=["dedupe_key"]).returning(_TASKS.c.id))
    for name, module in (("postgresql", pg_dialect), ("sqlite", sqlite_dialect))
}


@functools.cache
def _withdraw_statement(kinds: tuple[str, ...]) -> Any:
    """The UPDATE withdrawing ``kinds``, one per tuple of kinds: written ``kind = … OR …``, as an
    IN list's expanding parameter is rendered into the SQL again at every execution."""
    return Direct(update(_TASKS)
                  .where(_TASKS.c.plugin == bindparam("for_plugin"), or_(false(), *(_TASKS.c.kind == kind for kind in kinds)),
                         _TASKS.c.appointment_id == bindparam("for_appointment"), _TASKS.c.status == "pending")
                  .values(status="withdrawn"))


def plan_task(session: Session, *, plugin: str, kind: str, due_at: datetime, now: datetime,
              appointment_id: Optional[int] = None, payload: Optional[dict[str, Any]] = None,
              dedupe_key: Optional[str] = None) -> bool:
    """Plan a ``PluginTask`` in the caller's transaction; with ``dedupe_key`` only once ever.

    Returns whether a row was inserted."""
    values = dict(plugin=plugin, kind=kind, due_at=due_at, status="pending", appointment_id=appointment_id,
                  payload=payload or {}, dedupe_key=dedupe_key, attempts=0, last_error="", created_at=now)
    session.flush()  # what an ORM statement would autoflush: the row may name an appointment not yet written
    if dedupe_key is None:
        _PLAN.run(session.connection(), values)  # not the ORM: its unit of work for one row costs several times more
        return True
    connection = session.connection()
    return bool(_PLAN_ONCE[connection.dialect.name].rows(connection, values))


def withdraw_tasks(session: Session, *, plugin: str, kinds: Iterable[str], appointment_id: int) -> int:
    session.flush()  # what an ORM statement would autoflush: a task changed in the session
    return _withdraw_statement(tuple(kinds)).run(session.connection(),
                                                 {"for_plugin": plugin, "for_appointment": appointment_id})


def sweep_tasks(context: JobContext, *, plugin: str, kinds: Sequence[str],
                handle: Callable[[Session, PluginTask, Scheduler], Any], batch_size: int = 100,
                max_batches: int = 20, max_attempts: int = 5, retry_after: timedelta = timedelta(minutes=5),
                extra_filter: Any = None) -> int:
    """Claim due ``PluginTask`` rows of ``plugin`` and ``kinds`` and ``handle`` each.

    ``handle(session, task, scheduler)`` runs in a savepoint of the claiming
    transaction (returning a later ``datetime`` defers the task to then); ``scheduler`` is ``context.scheduler.within(session)``, so a
    booking it makes commits together with the task being marked done (and
    plugins hear of it after that commit).  A raising handler rolls back only
    its own work; the task is retried after ``retry_after`` and fails after
    ``max_attempts``.  Returns how many tasks were done."""
    done = 0
    for _ in range(max_batches):
        now = context.clock.now()
        clauses = [PluginTask.status == "pending", PluginTask.plugin == plugin, PluginTask.kind.in_(list(kinds))]
        if extra_filter is not None:
            clauses.append(extra_filter)
        # most sweeps find nothing due (a timed sweep between changes, the after-change sweeps
        # of a batch's second and later freed slots): look first without the write lock
        with reading(context.session_factory.kw["bind"]) as connection:
            if connection.execute(select(PluginTask.id).where(PluginTask.due_at <= now, *clauses).limit(1)).first() \
                    is None:
                break
        with context.session_factory() as session:
            view = context.scheduler.within(session)
            with session.begin():
                tasks = claim_due(session, PluginTask, PluginTask.due_at, batch_size, now, clauses)
                for task in tasks:
                    announced = len(view._deferred)
                    savepoint = session.begin_nested()
                    try:
                        result = handle(session, task, view)
                    except Exception as exc:  # noqa: BLE001 - retried later
                        savepoint.rollback()
                        del view._deferred[announced:]  # rolled back: nothing to announce
                        log.warning("task failed", exc_info=True,
                                    extra={"plugin": plugin, "task_kind": task.kind, "task": task.id})
                        task.attempts += 1
                        task.last_error = f"{type(exc).__name__}: {exc}"[:2000]
                        if task.attempts >= max_attempts:
                            task.status = "failed"
                        else:
                            task.due_at = now + retry_after * task.attempts
                    else:
                        savepoint.commit()
                        if isinstance(result, datetime) and result > now:
                            task.due_at = result  # deferred, e.g. out of quiet hours
                            continue
                        if task.status == "pending":
                            task.status = "done"
                        task.done_at = now
                        done += 1
            view.notify_committed()
        if len(tasks) < batch_size:
            break
    return done


#: What a renderer returns per outbox item: a message dict, or ``{"skip": reason}``.
Renderer = Callable[[Session, list[OutboxItem]], dict[int, dict[str, Any]]]


def dispatch_outbox(context: JobContext, *, kinds: Sequence[str], render: Renderer, batch_size: int = 200,
                    max_batches: int = 50, max_attempts: int = 5,
                    retry_after: timedelta = timedelta(minutes=5)) -> int:
    """Send due, pending outbox items of ``kinds`` through their channels; returns how many were sent.

    Items are claimed a batch at a time (``claim_due``), rendered at send time
    by ``render(session, items)`` (fresh data; ``{"skip": why}`` marks an item
    skipped), sent per channel — through ``channel.send_many`` when it has one,
    so a batch shares one connection — and marked sent, retried later with
    back-off, or failed after ``max_attempts``, all in the claiming transaction."""
    sent_total = 0
    for _ in range(max_batches):
        now = context.clock.now()
        with context.session_factory() as session, session.begin():
            items = claim_due(session, OutboxItem, OutboxItem.due_at, batch_size, now,
                              [OutboxItem.status == "pending", OutboxItem.kind.in_(list(kinds))])
            if not items:
                break
            try:
                messages = render(session, items)
            except Exception:  # noqa: BLE001 - render per item to find the bad one
                log.exception("rendering a batch failed; rendering one by one")
                messages = {}
                for item in items:
                    try:
                        messages.update(render(session, [item]))
                    except Exception as exc:  # noqa: BLE001
                        messages[item.id] = {"error": f"render failed: {type(exc).__name__}: {exc}"}
            by_channel: dict[str, list[tuple[OutboxItem, dict[str, Any]]]] = {}
            for item in items:
                message = messages.get(item.id) or {"skip": "nothing to send"}
                if "skip" in message:
                    item.status, item.done_at, item.last_error = "skipped", now, str(message["skip"])[:2000]
                    context.metrics.outbox_messages.labels(item.channel, item.kind, "skipped").inc()
                elif "error" in message:
                    _failed_send(context, item, message["error"], now, max_attempts, retry_after)
                else:
                    by_channel.setdefault(item.channel, []).append((item, message))
            for channel_name, batch in by_channel.items():
                channel = context.channels.get(channel_name)
                if channel is None:
                    for item, _message in batch:
                        _failed_send(context, item, f"no channel named {channel_name!r}", now, max_attempts,
                                     retry_after)
                    continue
                errors = _send_batch(channel, [message for _item, message in batch])
                sent_ids = []
                for (item, _message), error in zip(batch, errors):
                    if error is None:
                        sent_ids.append(item.id)
                        context.metrics.outbox_messages.labels(item.channel, item.kind, "sent").inc()
                    else:
                        _failed_send(context, item, f"{type(error).__name__}: {error}", now, max_attempts,
                                     retry_after)
                if sent_ids:  # one statement for the batch, in the claiming transaction
                    session.execute(update(OutboxItem).where(OutboxItem.id.in_(sent_ids))
                                    .values(status="sent", done_at=now, attempts=OutboxItem.attempts + 1,
                                            last_error="").execution_options(synchronize_session=False))
                    sent_total += len(sent_ids)
        if len(items) < batch_size:
            break
    return sent_total


def _send_batch(channel: Any, messages: list[dict[str, Any]]) -> list[Optional[BaseException]]:
    send_many = getattr(channel, "send_many", None)
    if callable(send_many):
        try:
            errors = list(send_many(messages))
            if len(errors) == len(messages):
                return errors
            raise RuntimeError(f"send_many returned {len(errors)} results for {len(messages)} messages")
        except Exception as exc:  # noqa: BLE001 - the whole batch failed
            return [exc] * len(messages)
    errors: list[Optional[BaseException]] = []
    for message in messages:
        try:
            channel.send(message)
            errors.append(None)
        except Exception as exc:  # noqa: BLE001 - per message
            errors.append(exc)
    return errors


def _failed_send(context: JobContext, item: OutboxItem, error: str, now: datetime, max_attempts: int,
                 retry_after: timedelta) -> None:
    item.attempts += 1
    item.last_error = error[:2000]
    if item.attempts >= max_attempts:
        item.status = "failed"
        context.metrics.outbox_messages.labels(item.channel, item.kind, "failed").inc()
        log.error("outbox item failed for good", extra={"outbox_id": item.id, "channel": item.channel,
                                                        "error": error})
    else:
        item.due_at = now + retry_after * item.attempts
        context.metrics.outbox_messages.labels(item.channel, item.kind, "retry").inc()
        log.warning("outbox item will be retried", extra={"outbox_id": item.id, "channel": item.channel,
                                                          "error": error})
