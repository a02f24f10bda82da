"""Every hook is documented (with its signature, rebuilt from the spec) and tested.

Like datasette's ``tests/test_docs.py``: documentation that is checked cannot rot.
"""
from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

from engine import hookspecs

REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "docs" / "plugins.md"
TESTS = REPO / "tests"


def hook_specs() -> dict[str, inspect.Signature]:
    return {name: inspect.signature(fn) for name, fn in vars(hookspecs).items()
            if name.startswith("slotengine_") and callable(fn) and hasattr(fn, "slotengine_spec")}


def documented_signature(name: str, signature: inspect.Signature) -> str:
    return f"{name}({', '.join(signature.parameters)})"


def test_there_are_hooks():
    assert len(hook_specs()) >= 13


@pytest.mark.parametrize("name", sorted(hook_specs()))
def test_hook_is_documented_with_its_signature(name):
    """docs/plugins.md has a heading ``### `slotengine_x(arg, ...)` `` for the hook."""
    expected = documented_signature(name, hook_specs()[name])
    headings = re.findall(r"^###\s+`([^`]+)`", DOCS.read_text(), flags=re.M)
    assert expected in headings, f"docs/plugins.md lacks the heading ### `{expected}`"


@pytest.mark.parametrize("name", sorted(hook_specs()))
def test_hook_has_a_docstring_saying_what_happens_if_it_raises(name):
    doc = inspect.getdoc(getattr(hookspecs, name)) or ""
    assert "If it raises" in doc or "if it raises" in doc.lower(), name


@pytest.mark.parametrize("name", sorted(hook_specs()))
def test_hook_has_a_test(name):
    """Some test module other than this one implements or calls the hook by name."""
    this = Path(__file__).resolve()
    for path in TESTS.rglob("test_*.py"):
        if path.resolve() != this and name in path.read_text():
            return
    pytest.fail(f"no test under tests/ mentions {name}")


def test_documented_hooks_exist():
    """No heading for a hook that is gone (or misspelled)."""
    specs = hook_specs()
    for heading in re.findall(r"^###\s+`(slotengine_\w+)\(", DOCS.read_text(), flags=re.M):
        assert heading in specs, f"docs/plugins.md documents {heading}, which is not a hook"
