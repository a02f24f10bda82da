"""Every hook slotengine calls, in one place.

A plugin is a module or object with functions decorated by
``engine.plugin.hookimpl`` and named like the specs below.  An implementation
may accept fewer arguments than its spec (pluggy passes only the ones it
names), and specs only ever grow by new arguments, so a plugin written today
keeps working.

Every hook is offered ``context``: the running engine's
``engine.jobs.JobContext`` (``context.scheduler``, ``context.session_factory``,
``context.clock``, ``context.plugins``, ``context.metrics``,
``context.channels``, ``context.settings`` — every plugin's settings section by
plugin name — and ``context.state``, a dict where a plugin keeps what it
parsed from its settings under its own name).  It is ``None`` only before
``slotengine_configure`` has run (a bare ``PluginHost`` in a unit test).

The host calls implementations one at a time, in pluggy's order (``tryfirst``
first, then the most recently registered, built-ins — registered last and
mostly ``trylast`` — at the end), so one raising plugin never silently stops
the others.  How a failure is treated is decided per hook by
``engine.plugin_host.PluginHost`` and written in each docstring under "If it
raises"; every failure is logged with the plugin's name and counted in
``slotengine_plugin_errors_total{plugin, hook}``.  Hook wrappers
(``wrapper=True``) are refused at registration for that reason.

``docs/plugins.md`` documents each hook with an example; a test checks that
it carries every signature below and that every hook has a test.
"""
from __future__ import annotations

from datetime import date
from typing import TYPE_CHECKING, Any, Callable, Optional

import pluggy

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from engine.jobs import JobContext
    from engine.models import Appointment, Coverage, Patient, Slot, WaitlistEntry
    from engine.requests import Actor, Candidate, Change, SlotQuery, UrgentRequest
    from engine.service import Scheduler

PROJECT = "slotengine"
hookspec = pluggy.HookspecMarker(PROJECT)

#: The shape of an HTTP handler registered with ``slotengine_register_http_routes``.
HttpHandler = Callable[[bytes, "dict[str, str]", "dict[str, str]"], "tuple[int, dict[str, Any]]"]


# --- lifecycle and registration ----------------------------------------------


@hookspec
def slotengine_configure(settings: dict[str, Any], context: "JobContext") -> None:
    """Called once at start-up (and again on reload) before anything else,
    with this plugin's own configuration section (``[plugins.<name>]``, ``{}``
    when absent) and the engine context.  Validate the settings and keep what
    you parsed in ``context.state[<your name>]``.

    Results: ignored.  If it raises: start-up stops with the plugin named (a
    misconfigured plugin must not run half-configured).
    """


@hookspec
def slotengine_register_jobs(register: Callable[..., None], context: "JobContext") -> None:
    """Register timed jobs, at start-up, after ``slotengine_configure``:
    ``register(job_id, func, *, seconds=None, cron=None, at_start=False,
    misfire_grace_time=None)`` where ``func(context)`` runs in a worker thread
    (or on the event loop when it is a coroutine function) every ``seconds``,
    or on a ``cron`` dict (APScheduler ``CronTrigger`` fields, e.g.
    ``{"hour": 2}``; a ``"timezone"`` field sets the zone the fields are
    read in, else the scheduler's).  Job ids are fixed (prefix them with your plugin's
    name); each run is recorded in ``job_runs`` and in
    ``slotengine_job_runs_total``.  Jobs are sweeps: claim due rows with
    ``engine.jobs.claim_due``, act, mark them done in the same transaction.

    Results: ignored.  If it raises (or registers an id twice): start-up stops
    with the plugin named.
    """


@hookspec
def slotengine_register_channels(register: Callable[[str, Any], None], context: "JobContext") -> None:
    """Register message channels, at start-up, after ``slotengine_configure``:
    ``register(name, channel)`` where ``channel.send(message: dict) -> None``
    delivers one message (keys ``to``, ``subject``, ``text``, ``html``
    (optional), ``id``, ``kind``, ``language``) and raises on failure so the
    sweep retries it; a channel may also offer ``send_many(messages) ->
    list[Exception | None]`` to deliver a batch over one connection.  The
    first registration of a name wins and later ones are ignored (logged):
    vendors are called before the built-ins (``trylast``), so a vendor's
    ``sms`` channel replaces the built-in webhook.

    Results: ignored.  If it raises: start-up stops with the plugin named.
    """


@hookspec
def slotengine_register_http_routes(
    register: Callable[[str, str, "HttpHandler"], None], context: "JobContext"
) -> None:
    """Register HTTP endpoints served by the daemon's HTTP server:
    ``register(method, path, handler)`` with ``handler(body: bytes, headers:
    dict[str, str], query: dict[str, str]) -> tuple[int, dict]`` (status code
    and a JSON-serialisable body).  Header names arrive lower-cased.  The
    daemon serves them under its HTTP endpoint and requires, for anything but
    ``GET``, either ``Authorization: Bearer <token>`` or ``X-Slotengine-Signature:
    sha256=<hex HMAC-SHA256 of the body>`` (see ``engine.signing``); ``GET``
    routes are served without authentication, so never return patient data
    from one.  A handler must still check whatever identifies the caller's
    subject (a signed reply token).
    Handlers run in a worker thread; open a unit of work for database access.

    Results: ``PluginHost.http_routes()`` lists them.  If it raises, or two
    plugins register the same method and path: start-up stops with the plugin
    named.
    """


# --- booking ------------------------------------------------------------------


@hookspec
def slotengine_check_booking(
    session: "Session",
    appointment: "Appointment",
    patient: Optional["Patient"],
    action: str,
    context: "JobContext",
) -> Optional[dict[str, str]]:
    """Judge a booking before it is committed (``action`` is ``book``,
    ``hold``, ``reschedule`` or ``confirm``), inside its transaction: the
    appointment already has its time, provider and location.

    Return ``None`` to allow, ``{"decision": "veto", "reason": ...}`` to refuse
    it (the caller gets ``BookingVetoed``), or ``{"decision": "review",
    "reason": ...}`` to keep the time but hold the appointment for staff
    review (eligibility problems).  Every plugin is asked; the strongest
    answer wins (veto > review > allow).

    If it raises, or returns something else: fails closed — the booking is
    held for staff review with the plugin named as the reason.
    """


@hookspec(firstresult=True)
def slotengine_verify_coverage(
    session: "Session",
    appointment: "Appointment",
    patient: "Patient",
    coverages: "list[Coverage]",
    service_date: date,
    context: "JobContext",
) -> Optional[dict[str, Any]]:
    """Verify the patient's insurance for one appointment on ``service_date``
    (clinic-local date of service), at booking and again before the visit.
    ``coverages`` are the patient's coverages, primary first.

    Return ``{"outcome": "eligible" | "ineligible" | "unknown", "findings":
    [str, ...], "copay": float | None, "coverage_id": int | None, "source":
    str}``.  Stops at the first non-None result: a clearinghouse plugin
    answers before the built-in payer rules (``eligibility``, ``trylast``).
    Anything but ``eligible`` holds the booking for staff review.

    If it raises: fails closed — the outcome is ``error`` and the booking is
    held for staff review.
    """


@hookspec(firstresult=True)
def slotengine_schedule_owner(
    session: "Session", provider_id: Optional[int], location_id: Optional[int], context: "JobContext"
) -> Optional[str]:
    """Which outside system owns this calendar (the EHR, when slotengine
    mirrors its schedule)?  Return that system's name, or ``None`` when
    slotengine owns it.  Asked by ``Scheduler.request_booking``,
    ``request_reschedule`` and ``request_cancellation``: for an owned
    calendar the change is not made here but recorded as a
    ``ChangeRequest`` and announced as a ``change_requested`` change (the
    owner's plugin sends it on, e.g. as an HL7 SRM); it counts once the
    owner confirms it.  The built-in HL7 side answers for mirror feeds
    with ``requests_to``.

    Results: stops at the first non-None result.  If it raises: the error
    is logged and the request is refused (``PluginError``) -- guessing
    wrong would change a schedule we do not own, or never ask its owner.
    """


@hookspec
def slotengine_score_slot(
    session: "Session", candidate: "Candidate", query: "SlotQuery", context: "JobContext"
) -> Optional[float]:
    """Score a free-slot candidate in ``Scheduler.free_slots``; higher ranks
    first.  ``session`` is the search's own: read through it (never open a
    second one meanwhile: on SQLite it would wait for the caller's write
    lock).  Scores of all plugins are summed into ``candidate.score``, and
    each plugin's own is kept in ``candidate.scores`` by plugin name (shown
    by ``slotengine slots find --json``); the default ordering (earliest
    first) breaks ties.

    If it raises: that plugin's score counts as 0 and the error is logged.
    """


@hookspec
def slotengine_exclude_slot(
    session: "Session", candidate: "Candidate", query: "SlotQuery", context: "JobContext"
) -> Optional[str]:
    """Leave a free-slot candidate out of ``Scheduler.free_slots``: return
    why (a short sentence), or ``None`` to keep it.  Asked for each
    candidate while the search collects them, before scoring, so an
    excluded candidate makes room for a later one and the caller still gets
    up to ``query.limit``.  Read through ``session``, the search's own.

    Results: the first reason wins and later plugins are not asked about
    that candidate; the search hands excluded candidates, with
    ``candidate.excluded = "<plugin>: <reason>"``, to a caller that asks for
    them (``free_slots(query, excluded=[])``, ``slotengine slots find
    --explain``).  If it raises (or answers with something other than a
    string): the candidate is kept and the error logged — a broken filter
    must not empty the search.
    """


@hookspec
def slotengine_allow_overbook(
    session: "Session", candidate: "Candidate", patient_id: Optional[int], appointment_type: str, action: str,
    context: "JobContext",
) -> Optional[dict[str, Any]]:
    """Judge one more patient in a full slot (a seat above its capacity).
    ``candidate`` is the slot with the time the new appointment would take
    (``seats_left`` 0); ``action`` is ``search`` (``SlotQuery.overbook``: may
    the search offer this seat?) or ``book`` (``BookingRequest.overbook``:
    the booking's transaction, with the slot row locked — lock what else
    your arithmetic reads).  Read through ``session``.

    Return ``{"allow": True | False, "reason": str, ...}`` — keep every
    number the decision used in the dict (JSON-serialisable): it is put on
    the candidate (``candidate.overbook``), in the booking's change
    (``change.detail["overbook"]``) and in its audit entry — or ``None``
    for no opinion.  Every plugin is asked; the seat is given only when one
    allows and none refuses (the first refusal answers).  An overbooked
    appointment is ``overbooked`` (HL7 SCH-25 ``Overbook``).

    If it raises (or answers with something else): that counts as a
    refusal — a broken judge must not pile patients into a slot.
    """


# --- after a change ----------------------------------------------------------


@hookspec
def slotengine_schedule_changed(session: "Session", change: "Change", context: "JobContext") -> None:
    """Inside the transaction of a change to the schedule (booked, held,
    rescheduled, cancelled, no_show, completed, slots_opened, waitlisted, …):
    write follow-up work (reminders, notices, tasks) so it commits or rolls
    back with the change itself.

    Results: ignored.  If it raises: the plugin's work is rolled back to a
    savepoint and logged; the change itself still commits (a reminder plan
    must not cancel a booking).  The implementations share one savepoint
    while all succeed; when one raises, all of their work is rolled back and
    each is called again in a savepoint of its own -- so an implementation
    may be called twice for one change, its first work undone: do only
    database work through ``session`` here, never send anything.
    """


@hookspec
def slotengine_after_change(change: "Change", context: "JobContext") -> None:
    """After a change has committed: react quickly (offer a freed slot to
    the waitlist now rather than at the next sweep).  Runs outside any
    transaction; open your own unit of work.  Do durable work in
    ``slotengine_schedule_changed`` and only speed it up here: a crash
    between commit and this call loses the call.

    Results: ignored.  If it raises: logged with the plugin's name; other
    plugins still run (notifications fail open).
    """


@hookspec
def slotengine_staff_notice(session: "Session", notice: dict[str, Any], context: "JobContext") -> None:
    """Tell staff something, inside the caller's transaction.  ``notice`` has
    ``team`` (``front_desk``, ``billing``, ``interpreters``, ``referrals``…),
    ``subject``, ``text``, and optionally ``appointment_id``, ``patient_id``,
    ``address`` (send there instead of the team's address).  The built-in
    ``notices`` plugin turns it into an outbox row for the team's channel.
    Plugins send notices with ``context.plugins.staff_notice(session, notice)``.

    Results: ignored; every plugin is called.  If it raises: its work is
    rolled back to a savepoint and logged; the caller's work still commits.
    """


# --- patients -----------------------------------------------------------------


@hookspec
def slotengine_patient_instructions(
    session: "Session", appointment: "Appointment", location_code: str, language: str, context: "JobContext"
) -> Optional[list[str]]:
    """Return instruction lines for a patient (where to go, what to bring,
    how to prepare) for confirmations and reminders, in ``language`` (``en``,
    ``es``…, the language the message is written in).  Read what you need
    through ``session`` (the caller's; never open a second one meanwhile: on
    SQLite it would wait for the caller's write lock).  Lists of all plugins
    are concatenated in call order (vendors first, the built-in
    ``instructions`` plugin last).

    If it raises: logged; the other plugins' lines are still used.
    """


@hookspec
def slotengine_route_referral(
    session: "Session", referral: dict[str, Any], context: "JobContext"
) -> Optional[dict[str, Any]]:
    """Route a referral (``id``, ``patient_id``, ``specialty``, ``urgency``,
    ``payer_id``, ``language``, ``location_id``, ``referring_provider``) to a
    specialist.  Return ``{"provider_id": ..., "slot_id": ...}`` to book that
    slot, ``{"provider_id": ..., "waitlist": True}`` (provider optional) to
    put the patient on the waitlist, or ``{"unroutable": "why"}``.  Stops at
    the first non-None result; the built-in ``referrals`` router is
    ``trylast``.

    Search with ``context.scheduler.within(session).free_slots(...)`` so the
    search joins the caller's transaction.

    If it raises: logged, and the next plugin is asked.
    """


@hookspec(firstresult=True)
def slotengine_referral_received(
    session: "Session", referral: dict[str, Any], context: "JobContext"
) -> Optional[int]:
    """Record a referral that arrived (an HL7 ``REF^I12``; the service API
    ``plugins.referrals.receive_referral`` uses the same path) inside the
    caller's transaction, and return its id.  ``referral`` has ``patient_id``
    and ``specialty`` (lower case, ``_`` between words: ``cardiology``,
    ``family_medicine``) and optionally ``urgency`` (routine | urgent),
    ``payer_id`` (``None``: the patient's primary coverage),
    ``referring_provider``, ``referring_contact`` (an e-mail address where
    the referrer hears back), ``reason``, ``language``, ``location_id``,
    ``preferred_provider_id`` (the referred-to provider, when we know them),
    ``external_id`` (the sender's referral id: a resend with the same one
    returns the first referral's id and records nothing) and ``source``
    (``inbound:<message id>``).  Write only through ``session`` and
    ``context.scheduler.within(session)``: never open a second session
    (on SQLite it would wait for the caller's write lock).  Route the referral
    in the same transaction, or leave durable work that a sweep picks up.

    Results: stops at the first non-None result, which must be an ``int``;
    ``None`` from every plugin means no plugin handles referrals (an HL7
    ``REF^I12`` then fails: 207).  The built-in ``referrals`` plugin answers
    last (``trylast``).  Each implementation runs in its own savepoint.

    If it raises (or returns something other than an int or None): its
    savepoint is rolled back, the error is logged with the plugin's name and
    raised to the caller, whose transaction fails — an HL7 message is parked
    (error status, replayable): a referral must never be lost silently.
    """


@hookspec
def slotengine_score_waitlist_entry(
    entry: "WaitlistEntry", slot: "Slot", context: "JobContext"
) -> Optional[float]:
    """Score how well a waitlisted patient fits a freed slot; higher is
    offered first.  Scores of all plugins are added to the built-in ranking
    (urgency, days waiting, fit of type, duration, provider, preferences).

    If it raises: that plugin's score counts as 0 and the error is logged.
    """


# --- same-day emergencies ------------------------------------------------------


@hookspec(firstresult=True)
def slotengine_urgent_request(
    session: "Session", request: "UrgentRequest", actor: "Actor", scheduler: "Scheduler", context: "JobContext"
) -> Optional[dict[str, Any]]:
    """Place a patient who must be seen within ``request.earliest`` ..
    ``request.latest_start`` (``Scheduler.request_urgent``: the service API,
    an HL7 SRM whose priority or type marks it urgent, staff on the command
    line), inside the caller's transaction.  Make every change through
    ``scheduler`` (bound to ``session``; the caller delivers its after-commit
    notifications) and never open a second session.

    Return ``{"outcome": "booked" | "applied" | "proposed" | "waiting" |
    "unplaced", "request_id": ..., "appointment_id": ... or None,
    "proposal_id": ... or None, "explanation": str}``: booked into free time,
    booked after moving others (or with added capacity), a proposal waiting
    for staff, changes asked of the calendar's outside owner, or no way found
    (staff told).  The built-in ``emergency`` plugin answers last
    (``trylast``).

    Results: stops at the first non-None result; ``None`` from every plugin
    means no plugin handles urgent requests, and the engine books the
    earliest free time in the window (emergency holds first) or answers
    ``unplaced``.  Runs in a savepoint.  If it raises: the savepoint is
    rolled back and the error raised to the caller (an urgent request must
    never vanish silently; an HL7 message is parked).
    """
