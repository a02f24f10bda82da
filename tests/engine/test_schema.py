"""The migrations build exactly the schema the models declare, on both databases."""
from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

import engine.models  # noqa: F401 - registers every table on Base.metadata
from engine.db import Base, make_engine
from engine.schema import SchemaOutOfDate, current_revision, ensure_current, head_revision, upgrade


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
