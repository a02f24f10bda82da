"""The schedule's tables, in the scheduler's words.

Every timestamp is UTC (``UTCDateTime``); clinic-local time exists only at the
edges (templates, presentation) and in the two denormalised ``local_*`` slot
columns that let a search filter by the patient's allowed days and hours
without converting every row.
"""
from __future__ import annotations

from datetime import date, datetime, time
from typing import Any, Optional

from sqlalchemy import (
    JSON,
    Boolean,
    CheckConstraint,
    Date,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    Time,
    UniqueConstraint,
    false,
    text,
)
from sqlalchemy.orm import Mapped, mapped_column, relationship

from engine.calendar import LONGEST_SLOT
from engine.db import Base, UTCDateTime

# --- calendars ---------------------------------------------------------------


class Location(Base):
    __tablename__ = "locations"
    id: Mapped[int] = mapped_column(primary_key=True)
    code: Mapped[str] = mapped_column(String(64), unique=True)
    name: Mapped[str] = mapped_column(String(200))
    timezone: Mapped[str] = mapped_column(String(64))
    address: Mapped[str] = mapped_column(String(400), default="")
    instructions: Mapped[str] = mapped_column(Text, default="")


class Provider(Base):
    __tablename__ = "providers"
    id: Mapped[int] = mapped_column(primary_key=True)
    code: Mapped[str] = mapped_column(String(64), unique=True)
    family_name: Mapped[str] = mapped_column(String(100))
    given_name: Mapped[str] = mapped_column(String(100), default="")
    gender: Mapped[str] = mapped_column(String(1), default="U")  # F/M/O/U (HL7 0001)
    languages: Mapped[list[str]] = mapped_column(JSON, default=list)
    specialties: Mapped[list[str]] = mapped_column(JSON, default=list)
    networks: Mapped[list[str]] = mapped_column(JSON, default=list)  # payer networks
    location_id: Mapped[Optional[int]] = mapped_column(ForeignKey("locations.id"))
    active: Mapped[bool] = mapped_column(Boolean, default=True)

    @property
    def display_name(self) -> str:
        return f"{self.given_name} {self.family_name}".strip()


class Resource(Base):
    __tablename__ = "resources"
    id: Mapped[int] = mapped_column(primary_key=True)
    code: Mapped[str] = mapped_column(String(64), unique=True)
    name: Mapped[str] = mapped_column(String(200))
    kind: Mapped[str] = mapped_column(String(32))  # room | equipment
    location_id: Mapped[Optional[int]] = mapped_column(ForeignKey("locations.id"))
    active: Mapped[bool] = mapped_column(Boolean, default=True)


class ScheduleTemplate(Base):
    """A weekly rule in clinic-local time: on these weekdays, from..to, cut into slots."""

    __tablename__ = "schedule_templates"
    id: Mapped[int] = mapped_column(primary_key=True)
    code: Mapped[str] = mapped_column(String(64), unique=True)
    provider_id: Mapped[Optional[int]] = mapped_column(ForeignKey("providers.id"))
    resource_id: Mapped[Optional[int]] = mapped_column(ForeignKey("resources.id"))
    location_id: Mapped[int] = mapped_column(ForeignKey("locations.id"))
    weekdays: Mapped[list[int]] = mapped_column(JSON)  # 0 = Monday
    start_time: Mapped[time] = mapped_column(Time)
    end_time: Mapped[time] = mapped_column(Time)
    slot_minutes: Mapped[int] = mapped_column(Integer)
    slot_type: Mapped[str] = mapped_column(String(32))
    capacity: Mapped[int] = mapped_column(Integer, default=1)
    effective_from: Mapped[date] = mapped_column(Date)
    effective_to: Mapped[Optional[date]] = mapped_column(Date)
    __table_args__ = (
        CheckConstraint("capacity >= 1", name="capacity_positive"),
        CheckConstraint("slot_minutes >= 5", name="slot_minutes_min"),
        CheckConstraint(
            "(provider_id IS NOT NULL) OR (resource_id IS NOT NULL)", name="has_owner"
        ),
    )


class Slot(Base):
    __tablename__ = "slots"
    id: Mapped[int] = mapped_column(primary_key=True)
    template_id: Mapped[Optional[int]] = mapped_column(ForeignKey("schedule_templates.id"))
    provider_id: Mapped[Optional[int]] = mapped_column(ForeignKey("providers.id"))
    resource_id: Mapped[Optional[int]] = mapped_column(ForeignKey("resources.id"))
    location_id: Mapped[int] = mapped_column(ForeignKey("locations.id"))
    start: Mapped[datetime] = mapped_column(UTCDateTime)
    end: Mapped[datetime] = mapped_column(UTCDateTime)
    local_weekday: Mapped[int] = mapped_column(Integer)  # 0 = Monday, clinic-local
    local_minute: Mapped[int] = mapped_column(Integer)  # minutes after local midnight
    slot_type: Mapped[str] = mapped_column(String(32))
    capacity: Mapped[int] = mapped_column(Integer, default=1)
    booked: Mapped[int] = mapped_column(Integer, default=0)
    blocked: Mapped[bool] = mapped_column(Boolean, default=False)
    __table_args__ = (
        UniqueConstraint("template_id", "start"),
        CheckConstraint("booked >= 0", name="booked_not_negative"),
        Index("ix_slots_provider_start", "provider_id", "start"),
        Index("ix_slots_resource_start", "resource_id", "start"),
        Index("ix_slots_start", "start"),
    )

    @property
    def is_free(self) -> bool:
        return not self.blocked and self.slot_type != "blocked" and self.booked < self.capacity

    @classmethod
    def overlapping(cls, start: datetime, end: datetime) -> tuple:
        """Where a slot overlaps [start, end): ``select(Slot).where(owner, *Slot.overlapping(a, b))``.
        Bounded below by the longest a slot lasts (``calendar.LONGEST_SLOT``), so that the index
        on (owner, start) is read from a day before ``start``, not from the calendar's first slot:
        the cost stays the same however much history the calendar holds."""
        return cls.start >= start - LONGEST_SLOT, cls.start < end, cls.end > start


class TimeBlock(Base):
    """Time taken out of a calendar (meeting, leave, broken scanner): HL7 S23/S24."""

    __tablename__ = "time_blocks"
    id: Mapped[int] = mapped_column(primary_key=True)
    provider_id: Mapped[Optional[int]] = mapped_column(ForeignKey("providers.id"))
    resource_id: Mapped[Optional[int]] = mapped_column(ForeignKey("resources.id"))
    start: Mapped[datetime] = mapped_column(UTCDateTime)
    end: Mapped[datetime] = mapped_column(UTCDateTime)
    reason: Mapped[str] = mapped_column(String(400), default="")
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    __table_args__ = (
        # bookings and the roll-out look for a calendar's blocks over a time: not the whole table
        Index("ix_time_blocks_provider_start", "provider_id", "start"),
        Index("ix_time_blocks_resource_start", "resource_id", "start"),
    )


# --- patients ----------------------------------------------------------------


class Patient(Base):
    __tablename__ = "patients"
    id: Mapped[int] = mapped_column(primary_key=True)
    family_name: Mapped[str] = mapped_column(String(100), default="")
    given_name: Mapped[str] = mapped_column(String(100), default="")
    birth_date: Mapped[Optional[date]] = mapped_column(Date)
    sex: Mapped[str] = mapped_column(String(1), default="U")
    language: Mapped[str] = mapped_column(String(32), default="")
    email: Mapped[str] = mapped_column(String(200), default="")
    phones: Mapped[list[dict[str, str]]] = mapped_column(JSON, default=list)
    address: Mapped[dict[str, str]] = mapped_column(JSON, default=dict)
    needs_interpreter: Mapped[bool] = mapped_column(Boolean, default=False)
    mobility: Mapped[str] = mapped_column(String(32), default="")  # HL7 0009 code, e.g. A1
    other_needs: Mapped[str] = mapped_column(Text, default="")
    preferred_provider_gender: Mapped[str] = mapped_column(String(1), default="")
    preferred_weekdays: Mapped[list[int]] = mapped_column(JSON, default=list)
    preferred_earliest: Mapped[Optional[time]] = mapped_column(Time)
    preferred_latest: Mapped[Optional[time]] = mapped_column(Time)
    preferred_channel: Mapped[str] = mapped_column(String(16), default="")  # email | sms | voice
    confidential: Mapped[bool] = mapped_column(Boolean, default=False)
    # PID-30 / PID-29; the server default lets the column join a table that already holds patients
    deceased: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    deceased_at: Mapped[Optional[datetime]] = mapped_column(UTCDateTime)
    merged_into_id: Mapped[Optional[int]] = mapped_column(ForeignKey("patients.id"))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)

    identifiers: Mapped[list["PatientIdentifier"]] = relationship(
        back_populates="patient", order_by="PatientIdentifier.id"
    )
    coverages: Mapped[list["Coverage"]] = relationship(
        back_populates="patient", order_by="Coverage.priority"
    )


class PatientIdentifier(Base):
    __tablename__ = "patient_identifiers"
    id: Mapped[int] = mapped_column(primary_key=True)
    patient_id: Mapped[int] = mapped_column(ForeignKey("patients.id"), index=True)
    value: Mapped[str] = mapped_column(String(100))
    authority: Mapped[str] = mapped_column(String(100), default="")
    type_code: Mapped[str] = mapped_column(String(16), default="")  # HL7 0203: MR, PI, SS…
    patient: Mapped[Patient] = relationship(back_populates="identifiers")
    __table_args__ = (UniqueConstraint("authority", "type_code", "value"),)


class Coverage(Base):
    __tablename__ = "coverages"
    id: Mapped[int] = mapped_column(primary_key=True)
    patient_id: Mapped[int] = mapped_column(ForeignKey("patients.id"), index=True)
    payer_id: Mapped[str] = mapped_column(String(64))
    payer_name: Mapped[str] = mapped_column(String(200), default="")
    plan_id: Mapped[str] = mapped_column(String(64), default="")
    group_number: Mapped[str] = mapped_column(String(64), default="")
    member_id: Mapped[str] = mapped_column(String(64), default="")
    priority: Mapped[int] = mapped_column(Integer, default=1)
    effective_date: Mapped[Optional[date]] = mapped_column(Date)
    expiry_date: Mapped[Optional[date]] = mapped_column(Date)
    verification_status: Mapped[str] = mapped_column(String(32), default="unverified")
    verified_at: Mapped[Optional[datetime]] = mapped_column(UTCDateTime)
    patient: Mapped[Patient] = relationship(back_populates="coverages")
    __table_args__ = (UniqueConstraint("patient_id", "payer_id", "member_id"),)

    def active_on(self, day: date) -> bool:
        if self.effective_date and day < self.effective_date:
            return False
        if self.expiry_date and day > self.expiry_date:
            return False
        return True


# --- appointments ------------------------------------------------------------


class Appointment(Base):
    __tablename__ = "appointments"
    id: Mapped[int] = mapped_column(primary_key=True)
    placer_id: Mapped[Optional[str]] = mapped_column(String(100), unique=True)
    filler_id: Mapped[Optional[str]] = mapped_column(String(100), unique=True)
    status: Mapped[str] = mapped_column(String(20), index=True)
    appointment_type: Mapped[str] = mapped_column(String(32))
    reason: Mapped[str] = mapped_column(String(400), default="")
    urgency: Mapped[str] = mapped_column(String(16), default="routine")  # routine | urgent
    start: Mapped[datetime] = mapped_column(UTCDateTime)
    end: Mapped[datetime] = mapped_column(UTCDateTime)
    patient_id: Mapped[Optional[int]] = mapped_column(ForeignKey("patients.id"), index=True)
    provider_id: Mapped[Optional[int]] = mapped_column(ForeignKey("providers.id"))
    location_id: Mapped[Optional[int]] = mapped_column(ForeignKey("locations.id"))
    hold_expires_at: Mapped[Optional[datetime]] = mapped_column(UTCDateTime)
    notes: Mapped[str] = mapped_column(Text, default="")
    conflict: Mapped[str] = mapped_column(Text, default="")  # mirror mode: what overlaps
    review_reason: Mapped[str] = mapped_column(Text, default="")  # held for staff review
    eligibility: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    confirmed_at: Mapped[Optional[datetime]] = mapped_column(UTCDateTime)  # the patient said they will come
    source: Mapped[str] = mapped_column(String(32), default="api")  # api | mirror | filler
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)
    resources: Mapped[list["AppointmentResource"]] = relationship(
        back_populates="appointment", cascade="all, delete-orphan"
    )
    __table_args__ = (Index("ix_appointments_provider_start", "provider_id", "start"),)


class AppointmentResource(Base):
    __tablename__ = "appointment_resources"
    id: Mapped[int] = mapped_column(primary_key=True)
    appointment_id: Mapped[int] = mapped_column(ForeignKey("appointments.id"), index=True)
    resource_id: Mapped[int] = mapped_column(ForeignKey("resources.id"))
    appointment: Mapped[Appointment] = relationship(back_populates="resources")


class AppointmentSlot(Base):
    """Which slot seats an appointment occupies (a long visit can span several)."""

    __tablename__ = "appointment_slots"
    appointment_id: Mapped[int] = mapped_column(ForeignKey("appointments.id"), primary_key=True)
    slot_id: Mapped[int] = mapped_column(ForeignKey("slots.id"), primary_key=True, index=True)


class Reservation(Base):
    """The double-booking guard: one row per (subject, 5-minute unit, seat).

    A subject is a provider, a resource or a patient (``provider:7``).  The
    primary key makes the database refuse a second booking of the same unit,
    whatever the number of concurrent writers or daemons; capacity above one
    (overbooking) is expressed as further seats.  Portable to SQLite and
    PostgreSQL alike, unlike an exclusion constraint.
    """

    __tablename__ = "reservations"
    subject: Mapped[str] = mapped_column(String(40), primary_key=True)
    unit: Mapped[int] = mapped_column(Integer, primary_key=True)
    seat: Mapped[int] = mapped_column(Integer, primary_key=True)
    appointment_id: Mapped[int] = mapped_column(ForeignKey("appointments.id"), index=True)


class WaitlistEntry(Base):
    __tablename__ = "waitlist"
    id: Mapped[int] = mapped_column(primary_key=True)
    patient_id: Mapped[int] = mapped_column(ForeignKey("patients.id"), index=True)
    appointment_type: Mapped[str] = mapped_column(String(32))
    duration_minutes: Mapped[int] = mapped_column(Integer)
    urgency: Mapped[str] = mapped_column(String(16), default="routine")
    provider_id: Mapped[Optional[int]] = mapped_column(ForeignKey("providers.id"))
    specialty: Mapped[str] = mapped_column(String(64), default="")
    location_id: Mapped[Optional[int]] = mapped_column(ForeignKey("locations.id"))
    earliest: Mapped[Optional[datetime]] = mapped_column(UTCDateTime)
    latest: Mapped[Optional[datetime]] = mapped_column(UTCDateTime)
    current_appointment_id: Mapped[Optional[int]] = mapped_column(ForeignKey("appointments.id"))
    status: Mapped[str] = mapped_column(String(16), default="waiting", index=True)
    reason: Mapped[str] = mapped_column(String(400), default="")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)


class AuditEntry(Base):
    __tablename__ = "audit"
    id: Mapped[int] = mapped_column(primary_key=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    actor: Mapped[str] = mapped_column(String(100))
    source: Mapped[str] = mapped_column(String(200), default="")
    action: Mapped[str] = mapped_column(String(40))
    entity: Mapped[str] = mapped_column(String(40))
    entity_id: Mapped[Optional[int]] = mapped_column(Integer, index=True)
    from_state: Mapped[str] = mapped_column(String(20), default="")
    to_state: Mapped[str] = mapped_column(String(20), default="")
    reason: Mapped[str] = mapped_column(Text, default="")
    before: Mapped[Optional[dict[str, Any]]] = mapped_column(JSON)
    after: Mapped[Optional[dict[str, Any]]] = mapped_column(JSON)


# --- durable work queues ------------------------------------------------------


class InboundMessage(Base):
    """Raw bytes as received, committed before any positive acknowledgement."""

    __tablename__ = "inbound_messages"
    id: Mapped[int] = mapped_column(primary_key=True)
    feed: Mapped[str] = mapped_column(String(64))
    sender: Mapped[str] = mapped_column(String(200))  # MSH-3^MSH-4
    control_id: Mapped[str] = mapped_column(String(200))
    message_type: Mapped[str] = mapped_column(String(20), default="")
    peer: Mapped[str] = mapped_column(String(100), default="")
    received_at: Mapped[datetime] = mapped_column(UTCDateTime)
    raw: Mapped[bytes] = mapped_column(LargeBinary)
    # Tells a resend (same content) from a control id reused for another message.
    content_hash: Mapped[str] = mapped_column(String(64), default="")
    status: Mapped[str] = mapped_column(String(16), index=True)
    ack: Mapped[Optional[bytes]] = mapped_column(LargeBinary)
    application_ack: Mapped[Optional[bytes]] = mapped_column(LargeBinary)
    error: Mapped[str] = mapped_column(Text, default="")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    processed_at: Mapped[Optional[datetime]] = mapped_column(UTCDateTime)
    __table_args__ = (
        Index("ix_inbound_messages_sender_control_id", "sender", "control_id"),
        # A refused message is kept for the record but holds no key: its resend, once the
        # cause is fixed, is stored and applied (hl7.store).
        Index("uq_inbound_messages_accepted_key", "sender", "control_id", unique=True,
              sqlite_where=text("status != 'refused'"), postgresql_where=text("status != 'refused'")),
        Index("ix_inbound_messages_sender_status_id", "sender", "status", "id"),
    )


class OutboxItem(Base):
    """Work that must leave the building: written in the same transaction as its cause."""

    __tablename__ = "outbox"
    id: Mapped[int] = mapped_column(primary_key=True)
    channel: Mapped[str] = mapped_column(String(64))  # destination name / reminder channel
    kind: Mapped[str] = mapped_column(String(40))
    due_at: Mapped[datetime] = mapped_column(UTCDateTime)
    status: Mapped[str] = mapped_column(String(16), default="pending")
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)
    appointment_id: Mapped[Optional[int]] = mapped_column(ForeignKey("appointments.id"), index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    done_at: Mapped[Optional[datetime]] = mapped_column(UTCDateTime)
    __table_args__ = (Index("ix_outbox_status_due", "status", "due_at"),)


class JobRun(Base):
    __tablename__ = "job_runs"
    job_id: Mapped[str] = mapped_column(String(100), primary_key=True)
    last_started_at: Mapped[Optional[datetime]] = mapped_column(UTCDateTime)
    last_finished_at: Mapped[Optional[datetime]] = mapped_column(UTCDateTime)
    last_outcome: Mapped[str] = mapped_column(Text, default="")
    runs: Mapped[int] = mapped_column(Integer, default=0)


class PluginTask(Base):
    """Timed work a plugin planned in the same transaction as its cause
    (re-check coverage two days before, fill slots that were freed, release an
    emergency hold).  A sweep claims due rows and marks them done together with
    their effects; ``dedupe_key`` makes "plan this once" an insert that the
    database refuses the second time."""

    __tablename__ = "plugin_tasks"
    id: Mapped[int] = mapped_column(primary_key=True)
    plugin: Mapped[str] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(40))
    due_at: Mapped[datetime] = mapped_column(UTCDateTime)
    status: Mapped[str] = mapped_column(String(16), default="pending")  # pending | done | failed | withdrawn
    appointment_id: Mapped[Optional[int]] = mapped_column(ForeignKey("appointments.id"), index=True)
    payload: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    dedupe_key: Mapped[Optional[str]] = mapped_column(String(200), unique=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    done_at: Mapped[Optional[datetime]] = mapped_column(UTCDateTime)
    __table_args__ = (Index("ix_plugin_tasks_status_due", "status", "plugin", "due_at"),)


# --- plugin-owned records -----------------------------------------------------


class Referral(Base):
    """A request from a referring provider for a specialist consult.

    received → routed → booked | waitlisted → completed (or cancelled /
    unroutable); ``history`` keeps each step with its time and a note.
    """

    __tablename__ = "referrals"
    id: Mapped[int] = mapped_column(primary_key=True)
    external_id: Mapped[Optional[str]] = mapped_column(String(100), unique=True)  # e.g. RF1-6 of a REF^I12
    patient_id: Mapped[int] = mapped_column(ForeignKey("patients.id"), index=True)
    specialty: Mapped[str] = mapped_column(String(64))
    urgency: Mapped[str] = mapped_column(String(16), default="routine")  # routine | urgent
    payer_id: Mapped[str] = mapped_column(String(64), default="")
    referring_provider: Mapped[str] = mapped_column(String(200), default="")
    referring_contact: Mapped[str] = mapped_column(String(200), default="")  # where the referrer hears back
    reason: Mapped[str] = mapped_column(Text, default="")  # clinical: never sent to the patient
    language: Mapped[str] = mapped_column(String(32), default="")
    location_id: Mapped[Optional[int]] = mapped_column(ForeignKey("locations.id"))  # preferred
    status: Mapped[str] = mapped_column(String(16), default="received", index=True)
    provider_id: Mapped[Optional[int]] = mapped_column(ForeignKey("providers.id"))
    appointment_id: Mapped[Optional[int]] = mapped_column(ForeignKey("appointments.id"), index=True)
    waitlist_id: Mapped[Optional[int]] = mapped_column(ForeignKey("waitlist.id"))
    history: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)
    received_at: Mapped[datetime] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)


class WaitlistOffer(Base):
    """A freed slot offered to a waitlisted patient until ``expires_at``.

    Several patients may hold offers for one slot at once; the first to accept
    books it and the others' offers become ``taken``.
    """

    __tablename__ = "waitlist_offers"
    id: Mapped[int] = mapped_column(primary_key=True)
    waitlist_id: Mapped[int] = mapped_column(ForeignKey("waitlist.id"), index=True)
    patient_id: Mapped[int] = mapped_column(ForeignKey("patients.id"))
    slot_id: Mapped[int] = mapped_column(ForeignKey("slots.id"), index=True)
    start: Mapped[datetime] = mapped_column(UTCDateTime)
    end: Mapped[datetime] = mapped_column(UTCDateTime)
    provider_id: Mapped[Optional[int]] = mapped_column(ForeignKey("providers.id"))
    # offered | accepted | declined | expired | taken | withdrawn | requested (of the EHR) | refused (by it)
    status: Mapped[str] = mapped_column(String(16), default="offered")
    score: Mapped[float] = mapped_column(Float, default=0.0)
    offered_at: Mapped[datetime] = mapped_column(UTCDateTime)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)
    responded_at: Mapped[Optional[datetime]] = mapped_column(UTCDateTime)
    appointment_id: Mapped[Optional[int]] = mapped_column(ForeignKey("appointments.id"))
    __table_args__ = (Index("ix_waitlist_offers_status_expires", "status", "expires_at"),)


# --- change requests to an external schedule owner ---------------------------


class ChangeRequest(Base):
    """A change asked of the system that owns a calendar (the EHR, in mirror
    mode) rather than made here: it counts only once that system confirms it.

    pending → accepted (the owner said it will) → confirmed (its schedule
    shows it) — or refused / expired.  A requested booking holds its time
    here meanwhile (the appointment is ``held`` until confirmed).
    """

    __tablename__ = "change_requests"
    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))  # book | reschedule | cancel
    appointment_id: Mapped[int] = mapped_column(ForeignKey("appointments.id"), index=True)
    owner: Mapped[str] = mapped_column(String(100))
    status: Mapped[str] = mapped_column(String(16), default="pending", index=True)
    requested_start: Mapped[Optional[datetime]] = mapped_column(UTCDateTime)
    requested_end: Mapped[Optional[datetime]] = mapped_column(UTCDateTime)
    requested_provider_id: Mapped[Optional[int]] = mapped_column(ForeignKey("providers.id"))
    reason: Mapped[str] = mapped_column(Text, default="")
    actor: Mapped[str] = mapped_column(String(100))
    # what the requester wants back when the owner answers (e.g. a waitlist offer id)
    detail: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    outcome: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)
    decided_at: Mapped[Optional[datetime]] = mapped_column(UTCDateTime)


# --- operator console: sign-in sessions ---------------------------------------


class ConsoleSession(Base):
    """A signed-in console user.  The browser holds the token; only its SHA-256 is
    kept, so reading this table does not let anyone act as the user.  In the
    database rather than in memory so a restart or another node behind the same
    proxy keeps the sign-in, and signing out ends it everywhere."""

    __tablename__ = "console_sessions"
    token_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    username: Mapped[str] = mapped_column(String(100))
    via: Mapped[str] = mapped_column(String(16))  # password | proxy
    csrf_token: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)


# --- recall and preventive care -------------------------------------------------


class PatientFlag(Base):
    """A fact about a patient that rules can select on: a diagnosis code from
    DG1 (``icd10:E11.9``), a contact opt-out (``opt_out:recall``,
    ``opt_out:reminder``, ``opt_out:voice``)…  ``source`` says who set it
    (``hl7:DG1``, ``hl7:PD1-11``, ``patient reply``); a source that states its
    whole list again replaces only its own flags."""

    __tablename__ = "patient_flags"
    id: Mapped[int] = mapped_column(primary_key=True)
    patient_id: Mapped[int] = mapped_column(ForeignKey("patients.id"), index=True)
    flag: Mapped[str] = mapped_column(String(64))
    source: Mapped[str] = mapped_column(String(64))
    recorded_at: Mapped[datetime] = mapped_column(UTCDateTime)
    __table_args__ = (UniqueConstraint("patient_id", "flag"),)


class RecallTicket(Base):
    """One patient's due preventive care under one recall rule.

    open → contacted → escalated → closed (a matching visit booked or done, or
    no longer eligible), or suppressed (deceased, opted out); a cancelled
    booking reopens it.  ``reason`` says why the ticket is in its state and
    ``history`` keeps every step (contacts, escalations, closing, reopening).
    ``dedupe_key`` (rule, patient, the visit the interval counts from) makes
    "open this ticket once" an insert the database refuses the second time.
    """

    __tablename__ = "recall_tickets"
    id: Mapped[int] = mapped_column(primary_key=True)
    patient_id: Mapped[int] = mapped_column(ForeignKey("patients.id"), index=True)
    rule: Mapped[str] = mapped_column(String(64))
    dedupe_key: Mapped[str] = mapped_column(String(200), unique=True)
    status: Mapped[str] = mapped_column(String(16), default="open")
    # the completed visit the interval counts from; None: the patient never had one
    anchor_appointment_id: Mapped[Optional[int]] = mapped_column(ForeignKey("appointments.id"))
    due_date: Mapped[date] = mapped_column(Date)
    window_start: Mapped[date] = mapped_column(Date)
    window_end: Mapped[date] = mapped_column(Date)
    step: Mapped[int] = mapped_column(Integer, default=0)  # the next escalation step
    contacts: Mapped[int] = mapped_column(Integer, default=0)
    channels_used: Mapped[list[str]] = mapped_column(JSON, default=list)
    next_action_at: Mapped[Optional[datetime]] = mapped_column(UTCDateTime)
    reason: Mapped[str] = mapped_column(Text, default="")
    closed_by_appointment_id: Mapped[Optional[int]] = mapped_column(ForeignKey("appointments.id"), index=True)
    history: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)
    __table_args__ = (
        Index("ix_recall_tickets_status_next_action", "status", "next_action_at"),
        Index("ix_recall_tickets_patient_rule", "patient_id", "rule"),
    )


# --- patient flow: running late (plugins/flow.py) ------------------------------------


class FlowDelay(Base):
    """One estimate of how late a provider runs for the rest of a clinic day,
    and what was done about it.

    ``trigger`` is what prompted it (``checked_in`` or ``arrived`` far past
    the scheduled time, or ``staff`` saying so); ``explanation`` is the
    estimate in words and ``estimates`` each remaining appointment's
    scheduled and estimated start, delay, and what was decided for it and why
    (told a new arrival time, offered another day, left alone).
    """

    __tablename__ = "flow_delays"
    id: Mapped[int] = mapped_column(primary_key=True)
    provider_id: Mapped[int] = mapped_column(ForeignKey("providers.id"))
    location_id: Mapped[Optional[int]] = mapped_column(ForeignKey("locations.id"))
    local_day: Mapped[date] = mapped_column(Date)  # the clinic-local day
    trigger: Mapped[str] = mapped_column(String(16))  # checked_in | arrived | staff
    trigger_appointment_id: Mapped[Optional[int]] = mapped_column(ForeignKey("appointments.id"))
    observed_minutes: Mapped[int] = mapped_column(Integer)  # how late the trigger was (or staff said)
    actor: Mapped[str] = mapped_column(String(100))
    explanation: Mapped[str] = mapped_column(Text)
    estimates: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    __table_args__ = (Index("ix_flow_delays_provider_day", "provider_id", "local_day"),)


class FlowNotice(Base):
    """What one patient was told about one delay: the new suggested arrival
    time, and for the worst affected a concrete other time to move to
    (``offer_*``), answered through a signed reply token."""

    __tablename__ = "flow_notices"
    id: Mapped[int] = mapped_column(primary_key=True)
    delay_id: Mapped[int] = mapped_column(ForeignKey("flow_delays.id"), index=True)
    appointment_id: Mapped[int] = mapped_column(ForeignKey("appointments.id"), index=True)
    patient_id: Mapped[Optional[int]] = mapped_column(ForeignKey("patients.id"))
    scheduled_start: Mapped[datetime] = mapped_column(UTCDateTime)
    estimated_start: Mapped[datetime] = mapped_column(UTCDateTime)
    suggested_arrival: Mapped[datetime] = mapped_column(UTCDateTime)
    delay_minutes: Mapped[int] = mapped_column(Integer)
    channel: Mapped[str] = mapped_column(String(16), default="")  # "" when staff call instead
    reason: Mapped[str] = mapped_column(Text, default="")
    offer_slot_id: Mapped[Optional[int]] = mapped_column(ForeignKey("slots.id"))
    offer_start: Mapped[Optional[datetime]] = mapped_column(UTCDateTime)
    offer_end: Mapped[Optional[datetime]] = mapped_column(UTCDateTime)
    # "" (none) | offered | accepted | declined | taken (gone meanwhile)
    offer_status: Mapped[str] = mapped_column(String(16), default="")
    responded_at: Mapped[Optional[datetime]] = mapped_column(UTCDateTime)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)


# Arrival smoothing counts the arrivals at a location in a window for every search candidate.
Index("ix_appointments_location_start", Appointment.location_id, Appointment.start)


# --- no-show-aware overbooking (plugins/noshow.py) ----------------------------------


class ShowModel(Base):
    """One fit of the show-probability model on the site's own history
    (``plugins/showmodel.py``): its coefficients by feature name, their
    standard errors, and what it was fitted on.  The latest row is in use."""

    __tablename__ = "show_models"
    id: Mapped[int] = mapped_column(primary_key=True)
    fitted_at: Mapped[datetime] = mapped_column(UTCDateTime)
    history_from: Mapped[datetime] = mapped_column(UTCDateTime)
    history_to: Mapped[datetime] = mapped_column(UTCDateTime)
    sample_size: Mapped[int] = mapped_column(Integer)
    no_shows: Mapped[int] = mapped_column(Integer)
    coefficients: Mapped[dict[str, float]] = mapped_column(JSON)
    standard_errors: Mapped[dict[str, float]] = mapped_column(JSON)
    prior: Mapped[dict[str, float]] = mapped_column(JSON)
    prior_weight: Mapped[float] = mapped_column(Float)
    iterations: Mapped[int] = mapped_column(Integer)
    converged: Mapped[bool] = mapped_column(Boolean)
    log_loss: Mapped[float] = mapped_column(Float)


class ShowEstimate(Base):
    """An appointment's show probability and the terms that moved it most
    (``reasons``: feature, words, effect on the log-odds), from the model
    ``model_id`` (``None``: the prior, before any fit)."""

    __tablename__ = "show_estimates"
    appointment_id: Mapped[int] = mapped_column(ForeignKey("appointments.id"), primary_key=True)
    probability: Mapped[float] = mapped_column(Float)
    reasons: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)
    features: Mapped[dict[str, float]] = mapped_column(JSON, default=dict)
    model_id: Mapped[Optional[int]] = mapped_column(ForeignKey("show_models.id"))
    estimated_at: Mapped[datetime] = mapped_column(UTCDateTime)


class OverbookDecision(Base):
    """Why an appointment was given a seat above a full slot's capacity: the
    block's expected patients and overtime with the new one, against the
    budget, with every number used (``decision``)."""

    __tablename__ = "overbook_decisions"
    id: Mapped[int] = mapped_column(primary_key=True)
    appointment_id: Mapped[int] = mapped_column(ForeignKey("appointments.id"), index=True)
    slot_id: Mapped[int] = mapped_column(ForeignKey("slots.id"))
    provider_id: Mapped[Optional[int]] = mapped_column(ForeignKey("providers.id"))
    block_start: Mapped[datetime] = mapped_column(UTCDateTime)
    block_end: Mapped[datetime] = mapped_column(UTCDateTime)
    expected_present: Mapped[float] = mapped_column(Float)
    expected_overtime_minutes: Mapped[float] = mapped_column(Float)
    decision: Mapped[dict[str, Any]] = mapped_column(JSON)
    decided_at: Mapped[datetime] = mapped_column(UTCDateTime)


# --- same-day emergencies (plugins/emergency.py) -------------------------------------


class EmergencyRequest(Base):
    """An urgent request and what became of it: booked into free time, a
    proposal (moves or added capacity) applied, rejected or expired, or
    unplaced.  ``explanation`` keeps each step tried and why."""

    __tablename__ = "emergency_requests"
    id: Mapped[int] = mapped_column(primary_key=True)
    patient_id: Mapped[int] = mapped_column(ForeignKey("patients.id"), index=True)
    appointment_type: Mapped[str] = mapped_column(String(32))
    duration_minutes: Mapped[int] = mapped_column(Integer)
    earliest: Mapped[datetime] = mapped_column(UTCDateTime)
    latest_start: Mapped[datetime] = mapped_column(UTCDateTime)
    provider_id: Mapped[Optional[int]] = mapped_column(ForeignKey("providers.id"))
    specialty: Mapped[str] = mapped_column(String(64), default="")
    location_id: Mapped[Optional[int]] = mapped_column(ForeignKey("locations.id"))
    reason: Mapped[str] = mapped_column(String(400), default="")  # clinical: never sent to a patient
    notes: Mapped[str] = mapped_column(Text, default="")
    placer_id: Mapped[Optional[str]] = mapped_column(String(100), index=True)
    requested_by: Mapped[str] = mapped_column(String(100))
    source: Mapped[str] = mapped_column(String(200), default="")
    # booked | proposed | waiting | applied | rejected | expired | unplaced
    status: Mapped[str] = mapped_column(String(16), index=True)
    appointment_id: Mapped[Optional[int]] = mapped_column(ForeignKey("appointments.id"))
    explanation: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)


class EmergencyProposal(Base):
    """How to make room for one urgent request: where the urgent visit goes,
    whom it moves (``EmergencyMove``) or which added capacity it uses, the
    objective values that made it the best, and the staff decision."""

    __tablename__ = "emergency_proposals"
    id: Mapped[int] = mapped_column(primary_key=True)
    request_id: Mapped[int] = mapped_column(ForeignKey("emergency_requests.id"), index=True)
    kind: Mapped[str] = mapped_column(String(16))  # moves | on_call | overflow
    # pending | approved | rejected | applied | expired | failed
    status: Mapped[str] = mapped_column(String(16), index=True)
    urgent: Mapped[dict[str, Any]] = mapped_column(JSON)  # the urgent visit's placement
    patients_moved: Mapped[int] = mapped_column(Integer)
    delays_minutes: Mapped[list[Optional[float]]] = mapped_column(JSON, default=list)  # largest first; null: cancelled
    candidates: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)  # visits considered, and why (not)
    explanation: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    needs_approval: Mapped[bool] = mapped_column(Boolean, default=True)
    decided_by: Mapped[str] = mapped_column(String(100), default="")
    decided_at: Mapped[Optional[datetime]] = mapped_column(UTCDateTime)
    decision_reason: Mapped[str] = mapped_column(Text, default="")
    applied_at: Mapped[Optional[datetime]] = mapped_column(UTCDateTime)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)


class EmergencyMove(Base):
    """One patient moved for an urgent request: from where, to where (or
    cancelled), the delay, the other alternatives they are offered, and
    whether it happened (``applied``) or awaits the calendar's owner."""

    __tablename__ = "emergency_moves"
    id: Mapped[int] = mapped_column(primary_key=True)
    proposal_id: Mapped[int] = mapped_column(ForeignKey("emergency_proposals.id"), index=True)
    appointment_id: Mapped[int] = mapped_column(ForeignKey("appointments.id"), index=True)
    patient_id: Mapped[int] = mapped_column(ForeignKey("patients.id"), index=True)
    action: Mapped[str] = mapped_column(String(16))  # reschedule | cancel
    from_start: Mapped[datetime] = mapped_column(UTCDateTime)
    from_provider_id: Mapped[Optional[int]] = mapped_column(ForeignKey("providers.id"))
    to_start: Mapped[Optional[datetime]] = mapped_column(UTCDateTime)
    to_provider_id: Mapped[Optional[int]] = mapped_column(ForeignKey("providers.id"))
    to_slot_id: Mapped[Optional[int]] = mapped_column(ForeignKey("slots.id"))
    delay_minutes: Mapped[Optional[float]] = mapped_column(Float)
    alternatives: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)  # offered besides the new time
    why: Mapped[str] = mapped_column(Text, default="")
    # planned | requested | applied | failed | withdrawn | chosen (the patient took an alternative)
    status: Mapped[str] = mapped_column(String(16), default="planned")
    applied_at: Mapped[Optional[datetime]] = mapped_column(UTCDateTime, index=True)
