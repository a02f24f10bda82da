"""``engine.db.reading``: reads outside any transaction, which on SQLite take no write
lock; and ``sweep_tasks``, which looks with it before it opens a write transaction."""
from __future__ import annotations

import threading
from datetime import datetime, timedelta, timezone

from sqlalchemy import event, func, select

from engine.db import reading
from engine.jobs import make_context, plan_task, sweep_tasks
from engine.models import PluginTask


def test_a_read_neither_waits_for_the_writer_nor_sees_its_uncommitted_rows(slotengine_session_factory,
                                                                          slotengine_engine):
    with slotengine_session_factory() as session, session.begin():
        plan_task(session, plugin="test", kind="work", due_at=_now(), now=_now())
    writer = slotengine_session_factory()
    writer.begin()
    plan_task(writer, plugin="test", kind="work", due_at=_now(), now=_now())  # the writer holds the lock now
    seen: list[int] = []

    def read() -> None:
        with reading(slotengine_engine) as connection:
            seen.append(connection.execute(select(func.count()).select_from(PluginTask)).scalar_one())

    reader = threading.Thread(target=read)
    reader.start()
    reader.join(5)
    try:
        assert not reader.is_alive(), "the read waited for the write transaction"
        assert seen == [1]
    finally:
        writer.commit()
        writer.close()
    with reading(slotengine_engine) as connection:
        assert connection.execute(select(func.count()).select_from(PluginTask)).scalar_one() == 2


def test_a_sweep_with_nothing_due_opens_no_transaction(slotengine_scheduler, slotengine_engine, slotengine_clock):
    context = make_context(slotengine_scheduler)
    handled: list[int] = []
    sent: list[str] = []

    def _sent(_conn, _cursor, statement, *_args):
        sent.append(" ".join(statement.split()))

    with slotengine_scheduler.sessions() as session, session.begin():
        plan_task(session, plugin="test", kind="work", due_at=slotengine_clock.now() + timedelta(hours=1),
                  now=slotengine_clock.now())
    event.listen(slotengine_engine, "before_cursor_execute", _sent)
    try:
        assert sweep_tasks(context, plugin="test", kinds=["work"], handle=lambda _s, task, _v: handled.append(task.id)) == 0
        # one look: no BEGIN (SQLite), no claim FOR UPDATE (PostgreSQL)
        assert len(sent) == 1 and sent[0].startswith("SELECT") and "FOR UPDATE" not in sent[0]
        assert handled == []
        slotengine_clock.advance(hours=2)
        assert sweep_tasks(context, plugin="test", kinds=["work"], handle=lambda _s, task, _v: handled.append(task.id)) == 1
        assert len(handled) == 1
    finally:
        event.remove(slotengine_engine, "before_cursor_execute", _sent)


def _now() -> datetime:
    return datetime(2026, 3, 2, 8, 0, tzinfo=timezone.utc)
