"""The migrations build exactly the schema the models declare, on both databases."""
from __future__ import annotations

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect, text
from sqlalchemy.exc import IntegrityError

import engine.models  # noqa: F401 - registers every table on Base.metadata
from engine.db import Base, make_engine
from engine.schema import SchemaOutOfDate, alembic_config, current_revision, ensure_current, head_revision, upgrade


@pytest.fixture
def empty_engine(slotengine_database_url):
    engine = make_engine(slotengine_database_url)
    yield engine
    engine.dispose()


def test_upgrade_on_an_empty_database_matches_the_models(empty_engine):
    assert inspect(empty_engine).get_table_names() == []
    with pytest.raises(SchemaOutOfDate) as caught:
        ensure_current(empty_engine)
    assert "slotengine db upgrade" in str(caught.value)

    upgrade(empty_engine)

    assert current_revision(empty_engine) == head_revision()
    ensure_current(empty_engine)
    with empty_engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True, "compare_server_default": True})
        differences = compare_metadata(context, Base.metadata)
    assert differences == [], "\n".join(map(str, differences))
    tables = set(inspect(empty_engine).get_table_names())
    assert tables == set(Base.metadata.tables) | {"alembic_version"}


def test_upgrade_twice_is_harmless(empty_engine):
    upgrade(empty_engine)
    upgrade(empty_engine)
    assert current_revision(empty_engine) == head_revision()


def test_0008_refused_messages_give_up_their_key_and_take_it_back_on_downgrade(empty_engine):
    """Upgraded with messages in it: a refused message's key is free for its accepted resend;
    going back, the key is unique again and the refusal gives way to the accepted message."""
    upgrade(empty_engine, "0007")
    row = ("INSERT INTO inbound_messages (feed, sender, control_id, message_type, peer, received_at, raw, "
           "content_hash, status, error, attempts) VALUES ('ehr', 'EPIC^NORTH', :control_id, 'ADT^A08', '', "
           "'2026-11-27 10:00:00.000000', :raw, '', :status, '', 0)")
    with empty_engine.begin() as connection:
        connection.execute(text(row), {"control_id": "C1", "raw": b"MSH", "status": "refused"})
        connection.execute(text(row), {"control_id": "C2", "raw": b"MSH", "status": "applied"})
    upgrade(empty_engine)
    with empty_engine.begin() as connection:
        connection.execute(text(row), {"control_id": "C1", "raw": b"MSH", "status": "received"})
    with pytest.raises(IntegrityError), empty_engine.begin() as connection:
        connection.execute(text(row), {"control_id": "C1", "raw": b"MSH", "status": "received"})

    command.downgrade(alembic_config(empty_engine), "0007")
    with empty_engine.connect() as connection:
        assert connection.execute(text("SELECT control_id, status FROM inbound_messages ORDER BY id")).all() == [
            ("C2", "applied"), ("C1", "received")]
    with pytest.raises(IntegrityError), empty_engine.begin() as connection:
        connection.execute(text(row), {"control_id": "C2", "raw": b"MSH", "status": "refused"})
