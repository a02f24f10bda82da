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
)
from sqlalchemy.orm import Mapped, mapped_column, relationship

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
        UniqueConstraint("sender", "control_id"),
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
    # offered | accepted | declined | expired | taken | withdrawn
    status: Mapped[str] = mapped_column(String(16), default="offered")
    score: Mapped[float] = mapped_column(Float, default=0.0)
    offered_at: Mapped[datetime] = mapped_column(UTCDateTime)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)
    responded_at: Mapped[Optional[datetime]] = mapped_column(UTCDateTime)
    appointment_id: Mapped[Optional[int]] = mapped_column(ForeignKey("appointments.id"))
    __table_args__ = (Index("ix_waitlist_offers_status_expires", "status", "expires_at"),)
