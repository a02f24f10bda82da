import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CORPUS = Path(os.environ.get("SLOTENGINE_CORPUS", REPO.parent / "shared" / "hl7-corpus"))


@pytest.fixture(scope="session")
def corpus_dir() -> Path:
    if not CORPUS.is_dir():
        pytest.fail(f"HL7 corpus not found at {CORPUS}; set SLOTENGINE_CORPUS")
    return CORPUS


@pytest.fixture
def smtp_sink():
    """A real SMTP server (aiosmtpd) on loopback that keeps every message it receives."""
    from aiosmtpd.controller import Controller

    from tests.plugins.helpers import SmtpSink, free_port

    sink = SmtpSink()
    sink.port = free_port()
    controller = Controller(sink, hostname="127.0.0.1", port=sink.port)
    controller.start()
    try:
        yield sink
    finally:
        controller.stop()
