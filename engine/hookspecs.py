"""Every hook slotengine calls, in one place.

A plugin is a module or object with functions decorated by
``engine.plugin.hookimpl`` and named like the specs below.  An implementation
may accept fewer arguments than its spec (pluggy passes only the ones it
names), and specs only ever grow by new arguments, so a plugin written today
keeps working.

How a failing plugin is treated is decided per hook by ``engine.plugins.PluginHost``
and written in each docstring under "If it raises".
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Optional

import pluggy

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from engine.models import Appointment, Patient
    from engine.requests import Candidate, Change, SlotQuery

PROJECT = "slotengine"
hookspec = pluggy.HookspecMarker(PROJECT)


@hookspec
def slotengine_configure(settings: dict[str, Any], context: Any) -> None:
    """Called once at start-up, and again on reload (SIGHUP), with this
    plugin's own configuration section (``[plugins.<name>]``, ``{}`` when
    absent) and the running engine's context (``context.scheduler``,
    ``context.clock``, ``context.session_factory``).

    Results: ignored.  If it raises: start-up stops with the plugin named (a
    misconfigured plugin must not run half-configured); on reload the old
    settings stay.
    """


@hookspec
def slotengine_register_jobs(register: Callable[..., None]) -> None:
    """Register timed jobs: ``register(job_id, func, seconds=N)`` where
    ``func(context)`` runs in a worker thread every N seconds.  Jobs are sweeps:
    claim due rows, act, mark them done in the same transaction.

    Results: ignored.  If it raises: start-up stops with the plugin named.
    """


@hookspec
def slotengine_check_booking(
    session: "Session", appointment: "Appointment", patient: Optional["Patient"], action: str
) -> Optional[dict[str, str]]:
    """Judge a booking before it is committed (``action`` is ``book``,
    ``hold``, ``reschedule`` or ``confirm``), inside its transaction.

    Return ``None`` to allow, ``{"decision": "veto", "reason": ...}`` to refuse
    it (the caller gets ``BookingVetoed``), or ``{"decision": "review",
    "reason": ...}`` to keep the time but hold the appointment for staff
    review (eligibility problems).  Every plugin is asked; the strongest
    answer wins (veto > review > allow).

    If it raises: fails closed — the booking is held for staff review with the
    plugin named as the reason.
    """


@hookspec
def slotengine_score_slot(candidate: "Candidate", query: "SlotQuery") -> Optional[float]:
    """Score a free-slot candidate; higher ranks first.  Scores of all plugins
    are summed; the default ordering (earliest first) breaks ties.

    If it raises: that plugin's score counts as 0 and the error is logged.
    """


@hookspec
def slotengine_schedule_changed(session: "Session", change: "Change") -> None:
    """Inside the transaction of a change to the schedule: write follow-up
    work (outbox messages, reminders to plan) so it commits or rolls back with
    the change itself.

    If it raises: the plugin's work is rolled back to a savepoint and logged;
    the change itself still commits (a reminder plan must not cancel a
    booking).
    """


@hookspec
def slotengine_after_change(change: "Change") -> None:
    """After a change has committed: notify staff, billing, waitlists.
    Runs outside any transaction; open your own unit of work if needed.

    If it raises: logged with the plugin's name; other plugins still run
    (notifications fail open).
    """


@hookspec
def slotengine_patient_instructions(
    appointment: "Appointment", location_code: str
) -> Optional[list[str]]:
    """Return instruction lines for a patient (where to go, what to bring,
    how to prepare) for confirmations and reminders.  Lists of all plugins
    are concatenated in plugin order.

    If it raises: logged; the other plugins' lines are still used.
    """


@hookspec
def slotengine_register_channels(register: Callable[[str, Any], None]) -> None:
    """Register message channels: ``register(name, channel)`` where
    ``channel.send(message: dict) -> None`` delivers a reminder or notice
    (e-mail, SMS, voice…) and raises on failure so the sweep retries.

    If it raises: start-up stops with the plugin named.
    """


@hookspec
def slotengine_route_referral(
    session: "Session", referral: dict[str, Any]
) -> Optional[dict[str, Any]]:
    """Route a referral (patient, specialty, urgency, payer) to a provider.
    Stops at the first non-None result: ``{"provider_id": ..., "slot_id":
    ...}`` or ``{"waitlist": True}``.

    If it raises: logged, and the next plugin is asked.
    """
