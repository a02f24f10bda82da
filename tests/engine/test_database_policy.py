"""The suite's own promise: PostgreSQL tests run in a plain ``pytest``; an
unreachable server fails them (a CI without PostgreSQL must not go green by
skipping), unless ``SLOTENGINE_SKIP_PG=1`` says so on purpose."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ONE_TEST = "tests/engine/test_schema.py::test_upgrade_twice_is_harmless"


def run_pytest(**env) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k not in ("SLOTENGINE_SKIP_PG", "SLOTENGINE_TEST_PG")}
    environment.update(env)
    return subprocess.run([sys.executable, "-m", "pytest", ONE_TEST, "-q", "-p", "no:cacheprovider", "-rs"],
                          cwd=REPO, env=environment, capture_output=True, text=True, timeout=120)


def test_both_databases_are_in_the_default_run():
    listed = subprocess.run([sys.executable, "-m", "pytest", ONE_TEST, "--collect-only", "-q", "-p",
                             "no:cacheprovider"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert "test_upgrade_twice_is_harmless[sqlite]" in listed.stdout
    assert "test_upgrade_twice_is_harmless[postgresql]" in listed.stdout


@pytest.mark.skipif(os.environ.get("SLOTENGINE_SKIP_PG", "") not in ("", "0"), reason="PostgreSQL skipped on purpose")
def test_an_unreachable_server_fails_the_postgresql_tests():
    run = run_pytest(SLOTENGINE_TEST_PG="postgresql+psycopg://postgres@127.0.0.1:1/test")
    assert run.returncode == 1, run.stdout + run.stderr
    assert "1 passed" in run.stdout and ("1 failed" in run.stdout or "1 error" in run.stdout), run.stdout
    assert "unreachable" in run.stdout and "SLOTENGINE_SKIP_PG=1" in run.stdout


def test_skipping_postgresql_must_be_asked_for():
    run = run_pytest(SLOTENGINE_TEST_PG="postgresql+psycopg://postgres@127.0.0.1:1/test", SLOTENGINE_SKIP_PG="1")
    assert run.returncode == 0, run.stdout + run.stderr
    assert "1 passed, 1 skipped" in run.stdout
