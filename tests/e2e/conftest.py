"""Fixtures shared by the end-to-end tests."""
from __future__ import annotations

import pytest


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def any_database_url(request, tmp_path):
    """A daemon's database: a SQLite file, then a PostgreSQL schema of its own."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'schedule.db'}"
        return
    from engine.testing import postgresql_schema_url

    yield from postgresql_schema_url()
