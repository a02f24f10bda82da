"""Every engine test that touches a database runs on SQLite *and* PostgreSQL.

``slotengine_database_url`` (from ``engine.testing``) is overridden here with
a parametrized fixture, so a plain ``pytest`` runs each such test twice:
``[sqlite]`` on a fresh file, ``[postgresql]`` on a fresh schema of the
server at ``SLOTENGINE_TEST_PG`` (default 127.0.0.1:5432/test).

- An unreachable PostgreSQL server fails the PostgreSQL tests; it does not
  skip them.  Set ``SLOTENGINE_SKIP_PG=1`` to skip them on purpose.
- ``-m "not postgres"`` / ``-m postgres`` selects one database.

Property tests run 120 hypothesis examples each; set
``SLOTENGINE_HYPOTHESIS_EXAMPLES=5000`` for a thorough run.
"""
from __future__ import annotations

import os
from typing import Iterator

import pytest
from sqlalchemy import text

from engine.db import make_engine
from engine.testing import DEFAULT_PG, postgresql_schema_url

SKIP_PG = os.environ.get("SLOTENGINE_SKIP_PG", "") not in ("", "0")

DATABASES = [
    "sqlite",
    pytest.param(
        "postgresql",
        marks=[
            pytest.mark.postgres,
            pytest.mark.skipif(SKIP_PG, reason="SLOTENGINE_SKIP_PG is set"),
        ],
    ),
]


def pg_server() -> str:
    return os.environ.get("SLOTENGINE_TEST_PG", DEFAULT_PG)


def _require_pg() -> None:
    """Fail (never skip) with a clear message when the server cannot be reached."""
    engine = make_engine(pg_server())
    try:
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
    except Exception as exc:  # noqa: BLE001 - reported as a test failure
        pytest.fail(
            f"PostgreSQL at {pg_server()} is unreachable ({type(exc).__name__}: {exc}); "
            "start it, point SLOTENGINE_TEST_PG at one, or set SLOTENGINE_SKIP_PG=1",
            pytrace=False,
        )
    finally:
        engine.dispose()


def database_url(kind: str, tmp_path) -> Iterator[str]:
    if kind == "postgresql":
        _require_pg()
        yield from postgresql_schema_url()
    else:
        yield f"sqlite:///{tmp_path / 'slotengine.db'}"


@pytest.fixture(params=DATABASES)
def db_kind(request) -> str:
    return request.param


@pytest.fixture
def slotengine_database_url(db_kind, tmp_path) -> Iterator[str]:
    yield from database_url(db_kind, tmp_path)


@pytest.fixture
def recorder():
    from tests.engine.helpers import ChangeRecorder

    return ChangeRecorder()


@pytest.fixture
def slotengine_plugins(recorder):
    """No built-ins; one plugin that records every Change (see ``recorder``)."""
    from engine.plugin_host import PluginHost

    return PluginHost(builtins=(), discover=False, extra=[("recorder", recorder)])


@pytest.fixture
def sch(slotengine_scheduler):
    """Short name: the demo clinic's scheduler (two weeks of slots from Mon 2026-03-02)."""
    return slotengine_scheduler


@pytest.fixture
def clock(slotengine_clock):
    return slotengine_clock
