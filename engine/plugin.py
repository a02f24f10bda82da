"""The whole public plugin API of slotengine.

A vendor plugin is a module with hook implementations::

    from engine.plugin import hookimpl

    @hookimpl
    def slotengine_check_booking(session, appointment, patient, action):
        if appointment.appointment_type == "mri" and patient and patient.mobility == "A1":
            return {"decision": "review", "reason": "wheelchair access to MRI"}

declared in the vendor's ``pyproject.toml``::

    [project.entry-points."slotengine.plugins"]
    acme_rules = "acme_slotengine.rules"

The hooks are listed and explained in ``engine.hookspecs`` and ``docs/plugins.md``;
``engine.testing`` is a pytest plugin with fixtures for testing a plugin
against a real engine.
"""
from __future__ import annotations

import pluggy

from engine.hookspecs import PROJECT

ENTRY_POINT_GROUP = "slotengine.plugins"
hookimpl = pluggy.HookimplMarker(PROJECT)

__all__ = ["ENTRY_POINT_GROUP", "PROJECT", "hookimpl"]
