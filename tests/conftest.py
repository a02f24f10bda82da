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
