"""Mirror mode, closing the loop: what our plugins want of the EHR's schedule is asked, not done.

When the EHR owns the schedule, a plugin that wants to change it (waitlist fill
moving a patient earlier, an emergency bumping a routine visit) calls
``Scheduler.request_booking`` / ``request_reschedule`` / ``request_cancellation``.
``MirrorRequests`` tells the engine which calendars the EHR owns
(``slotengine_schedule_owner``: the ``requests_to`` destination of a mirror
feed, limited by that destination's ``locations`` / ``providers``), and turns
each ``change_requested`` change into an SRM in the outbox, in the same
transaction (S01 book, S02 reschedule, S04 cancel).

The answer comes in two steps, and only the second one counts:

1. the SRR (the SRM's acknowledgement): AA marks the request ``accepted``
   (and notes the EHR's filler id from SCH-2); AE/AR marks it ``refused`` and
   a requested booking's hold is released -- ``OutboundDispatcher`` does this in
   the transaction that records the reply;
2. the EHR's own SIU for that appointment (S12 echoing our placer id in SCH-1,
   S13, S15): ``Scheduler.record_external_appointment`` applies it to our copy
   and marks the request ``confirmed``.

A request nobody answers expires (``owner_answer_timeout``) and gives its
held time back.  Each step is a change (``change_confirmed``,
``change_refused``, ``change_expired``) carrying the requester's ``detail``,
so the plugin that asked can follow up.
"""
from __future__ import annotations

import logging
from datetime import datetime
from typing import Any, Callable, Iterable, Optional

from sqlalchemy import select
from sqlalchemy.orm import Session

from engine.clock import Clock, SystemClock
from engine.models import Location, Provider
from engine.plugin import hookimpl
from engine.requests import Change
from hl7.config import DestinationConfig
from hl7.outbound import OutboundSettings, queue_srm

log = logging.getLogger("slotengine.mirror")

#: SRM trigger for each kind of change request.
TRIGGERS = {"book": "S01", "reschedule": "S02", "cancel": "S04"}


class MirrorRequests:
    """The plugin that asks the EHR (see the module doc).  ``owners``: the
    destinations named by mirror feeds' ``requests_to``, in feed order."""

    def __init__(self, owners: Iterable[DestinationConfig], settings: OutboundSettings = OutboundSettings(), *,
                 clock: Optional[Clock] = None, notify: Optional[Callable[[], None]] = None):
        self.owners = tuple(owners)
        self.settings = settings
        self.clock = clock
        self.notify = notify
        self._codes: dict[tuple[type, int], Optional[str]] = {}

    @hookimpl
    def slotengine_schedule_owner(self, session: Session, provider_id: Optional[int],
                                  location_id: Optional[int]) -> Optional[str]:
        for owner in self.owners:
            if owner.providers and self._code(session, Provider, provider_id) not in owner.providers:
                continue
            if owner.locations and self._location_code(session, provider_id, location_id) not in owner.locations:
                continue
            return owner.name
        return None

    @hookimpl
    def slotengine_schedule_changed(self, session: Session, change: Change, context: Any) -> None:
        if change.kind != "change_requested" or change.appointment_id is None:
            return
        owner = change.detail.get("owner")
        if owner not in {o.name for o in self.owners}:
            return
        clock = self.clock or (context.clock if context is not None else None) or SystemClock()
        kind = change.detail["request"]
        options: dict[str, Any] = {"reason": change.reason, "entered_by": change.actor.label}
        if kind == "reschedule":
            options["start"] = _instant(change.detail.get("requested_start"))
            options["end"] = options["start"]  # that exact start; the duration goes in ARQ-9
            options["provider_id"] = change.detail.get("requested_provider_id")
        item = queue_srm(session, change.appointment_id, TRIGGERS[kind], owner, self.settings, now=clock.now(),
                         change_request_id=change.detail["request_id"], **options)
        log.info("change requested of the schedule's owner",
                 extra={"owner": owner, "request_id": change.detail["request_id"], "request": kind,
                        "appointment_id": change.appointment_id, "outbox_id": item.id})

    @hookimpl
    def slotengine_after_change(self, change: Change) -> None:
        if self.notify is not None and change.kind == "change_requested":
            self.notify()

    def _code(self, session: Session, model: type, ident: Optional[int]) -> Optional[str]:
        if ident is None:
            return None
        key = (model, ident)
        if key not in self._codes:
            self._codes[key] = session.scalar(select(model.code).where(model.id == ident))
        return self._codes[key]

    def _location_code(self, session: Session, provider_id: Optional[int], location_id: Optional[int]) -> Optional[str]:
        if location_id is None and provider_id is not None:
            location_id = session.scalar(select(Provider.location_id).where(Provider.id == provider_id))
        return self._code(session, Location, location_id)


def request_owners(feeds: Iterable[Any], destinations: Iterable[DestinationConfig]) -> list[DestinationConfig]:
    """The destinations mirror feeds send their requests to (config has checked the names)."""
    by_name = {d.name: d for d in destinations}
    names = list(dict.fromkeys(f.requests_to for f in feeds if getattr(f, "requests_to", "")))
    return [by_name[name] for name in names if name in by_name]


def _instant(text: Optional[str]) -> Optional[datetime]:
    return datetime.fromisoformat(text) if text else None
