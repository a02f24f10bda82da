"""The store without an inbox (PostgreSQL's path; SQLite too when it is used so): which
stored message answers a key, on both databases."""
from __future__ import annotations

from typing import Iterator

import pytest
from sqlalchemy import select

from engine.metrics import Metrics
from engine.models import InboundMessage
from hl7.store import RECEIVED, REFUSED, MessageStore
from tests.engine.conftest import DATABASES, database_url
from tests.hl7.test_inbox import incoming


@pytest.fixture(params=DATABASES)
def slotengine_database_url(request, tmp_path) -> Iterator[str]:
    yield from database_url(request.param, tmp_path)


def stored(store: MessageStore) -> list[tuple[str, str]]:
    with store.sessions() as session:
        return [tuple(row) for row in session.execute(
            select(InboundMessage.control_id, InboundMessage.status).order_by(InboundMessage.id))]


def test_refused_messages_hold_no_key(slotengine_scheduler):
    store = MessageStore(slotengine_scheduler.sessions, Metrics())
    refused = store.store_batch([incoming("C1", status=REFUSED)])[0]
    assert store.store_batch([incoming("C1", status=REFUSED)])[0].message_id == refused.message_id  # kept once
    taken = store.store_batch([incoming("C1")])[0]
    assert (taken.duplicate, taken.status) == (False, RECEIVED) and taken.message_id != refused.message_id
    again = store.store_batch([incoming("C1")])[0]  # a resend of the accepted one
    assert (again.duplicate, again.message_id) == (True, taken.message_id)
    assert store.store_batch([incoming("C1", status=REFUSED)])[0].message_id == taken.message_id
    keyless = store.store_batch([incoming("", status=REFUSED), incoming("", status=REFUSED, body="B")])
    assert len({s.message_id for s in keyless}) == 2 and not any(s.duplicate for s in keyless)
    assert stored(store) == [("C1", REFUSED), ("C1", RECEIVED), ("", REFUSED), ("", REFUSED)]
