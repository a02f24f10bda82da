"""A plugin that misbehaves on purpose, for the fault tests.

Harmless unless configured: ``[plugins.sample_misbehaving] mode = "raise"``
(every hook raises), ``"garbage"`` (every hook returns nonsense) or
``"hang"`` (notifications never return).
"""
from __future__ import annotations

import threading

from engine.plugin import hookimpl

NAME = "sample_misbehaving"
_mode = {"value": "none"}
_forever = threading.Event()


@hookimpl
def slotengine_configure(settings):
    _mode["value"] = settings.get("mode", "none")


def _misbehave(garbage):
    if _mode["value"] == "raise":
        raise RuntimeError("the misbehaving plugin raised on purpose")
    if _mode["value"] == "garbage":
        return garbage
    return None


@hookimpl
def slotengine_check_booking(appointment):
    return _misbehave({"decision": 42, "nonsense": object()})


@hookimpl
def slotengine_schedule_changed(session, change):
    _misbehave(None)


@hookimpl
def slotengine_score_slot(candidate):
    return _misbehave("not a number")


@hookimpl
def slotengine_after_change(change):
    if _mode["value"] == "hang":
        _forever.wait()
    return _misbehave(["garbage"])
