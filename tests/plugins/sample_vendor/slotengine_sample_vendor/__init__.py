"""A sample vendor plugin, discovered through the ``slotengine.plugins`` entry point.

It shows the usual shapes: settings through ``slotengine_configure``, a
booking rule, a coverage verifier that answers before the built-in payer rules
(a stand-in for a clearinghouse), a timed job and an HTTP route.
"""
from __future__ import annotations

from engine.plugin import hookimpl

NAME = "sample_vendor"
VETO_REASON = "sample-vendor-veto"


@hookimpl
def slotengine_configure(settings, context):
    context.state[NAME] = {"payer": settings.get("payer", "SAMPLE"), "heartbeats": 0}


@hookimpl
def slotengine_check_booking(appointment, action):
    if appointment.reason == VETO_REASON:
        return {"decision": "veto", "reason": "the sample vendor refuses this booking"}
    return None


@hookimpl
def slotengine_verify_coverage(coverages, context):
    state = context.state.get(NAME) if context is not None else None
    if state and coverages and coverages[0].payer_id == state["payer"]:
        return {"outcome": "eligible", "findings": ["verified by the sample clearinghouse"], "copay": 5.0,
                "coverage_id": coverages[0].id}
    return None  # not ours: the next verifier answers


def heartbeat(context):
    context.state[NAME]["heartbeats"] += 1
    return context.state[NAME]["heartbeats"]


@hookimpl
def slotengine_register_jobs(register):
    register("sample_vendor.heartbeat", heartbeat, seconds=3600)


@hookimpl
def slotengine_register_http_routes(register):
    register("GET", "/sample/ping", lambda body, headers, query: (200, {"pong": True}))
