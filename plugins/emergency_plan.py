"""Where to squeeze in an urgent patient, and whom to move for it: the pure search.

No database here: ``plugins.emergency`` reads the day into a ``Problem`` and
acts on the ``Plan`` this module returns, so the search can be proved against
brute force on small random days (tests/plugins/test_emergency.py).

The model is the engine's own.  A calendar owner (``provider:7``,
``resource:2``) has slots with a type, a capacity and a count of seats
booked; an appointment occupies consecutive slots of one owner.  A placement
of ``d`` minutes starts at a slot start and takes one seat in each slot that
covers ``[start, start + d)``, back to back, every one accepting the
appointment's type (``engine.service.slot_accepts``, handed in as
``Problem.accepts``) and not blocked.

The objective, compared lexicographically:

1. the number of patients moved (fewest first);
2. their delays, largest first (a "leximax" comparison: the worst-off moved
   patient waits as little as possible, then the next worst-off, and so on);
   a cancellation — no acceptable alternative — counts as an infinite delay,
   so a plan cancels as few visits as it can;
3. the urgent patient's start (earliest first);
4. appointment ids and alternative starts, only to make the answer
   deterministic.

A delay is the moved visit's new start minus its old start: alternatives are
never earlier than the original time (a patient asked to come sooner on the
day may not be able to), never sooner than ``Problem.min_start`` (the notice
a patient needs), on an owner the appointment allows (``allowed_owners``),
within the patient's preferred weekdays and hours, clear of the patient's
other visits.

The search is exact: every placement of the urgent visit in its window, every
set of movable occupants whose removal makes room (by increasing size, never
more than the best plan found so far), and for each set a branch-and-bound
over the moved patients' alternatives in order of delay.  A branch is cut when
its lower bound — the delays fixed so far plus each remaining patient's
smallest possible delay — cannot beat the best plan's delays; that bound is a
true lower bound of every completion, so nothing better is ever cut.
"""
from __future__ import annotations

import itertools
import math
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Callable, Iterable, Optional, Sequence

CANCEL = math.inf  # the delay of a visit that has no acceptable alternative


@dataclass(frozen=True)
class PlanSlot:
    id: int
    owner: str
    start: datetime
    end: datetime
    slot_type: str
    capacity: int
    booked: int
    blocked: bool = False
    local_weekday: int = 0
    local_minute: int = 0


@dataclass(frozen=True)
class Preferences:
    """A moved patient's limits: clinic-local weekdays (0 = Monday) and minutes after midnight."""

    weekdays: tuple[int, ...] = ()
    earliest_minute: Optional[int] = None
    latest_minute: Optional[int] = None

    def allow(self, slot: PlanSlot) -> bool:
        if self.weekdays and slot.local_weekday not in self.weekdays:
            return False
        if self.earliest_minute is not None and slot.local_minute < self.earliest_minute:
            return False
        if self.latest_minute is not None and slot.local_minute >= self.latest_minute:
            return False
        return True


@dataclass(frozen=True)
class PlanAppointment:
    id: int
    patient_id: int
    owner: str
    start: datetime
    end: datetime
    appointment_type: str
    slot_ids: tuple[int, ...]
    why_not_movable: str = ""  # empty: it may be moved

    @property
    def movable(self) -> bool:
        return not self.why_not_movable

    @property
    def duration(self) -> timedelta:
        return self.end - self.start


@dataclass(frozen=True)
class Placement:
    owner: str
    start: datetime
    end: datetime
    slot_ids: tuple[int, ...]


@dataclass
class Problem:
    """One urgent need and the calendars around it."""

    slots: Sequence[PlanSlot]
    appointments: Sequence[PlanAppointment]
    accepts: Callable[[PlanSlot, str, str], bool]
    urgent_type: str
    urgent_duration: timedelta
    urgent_owners: frozenset[str]
    earliest: datetime
    latest_start: datetime
    min_start: datetime  # no moved patient is asked to come before this
    urgent_busy: tuple[tuple[datetime, datetime], ...] = ()
    allowed_owners: dict[int, frozenset[str]] = field(default_factory=dict)  # by appointment id; default its own
    preferences: dict[int, Preferences] = field(default_factory=dict)  # by patient id
    patient_busy: dict[int, tuple[tuple[datetime, datetime, int], ...]] = field(default_factory=dict)
    """Other visits of the moved patients: (start, end, appointment id)."""
    max_moves: int = 3

    def __post_init__(self) -> None:
        self.by_owner: dict[str, list[PlanSlot]] = {}
        for slot in sorted(self.slots, key=lambda s: (s.owner, s.start)):
            self.by_owner.setdefault(slot.owner, []).append(slot)
        self.by_id = {slot.id: slot for slot in self.slots}
        self.by_appointment = {a.id: a for a in self.appointments}
        self.occupants: dict[int, list[int]] = {}
        for appointment in self.appointments:
            for slot_id in appointment.slot_ids:
                self.occupants.setdefault(slot_id, []).append(appointment.id)


@dataclass(frozen=True)
class Move:
    appointment_id: int
    patient_id: int
    to: Optional[Placement]  # None: cancelled, no acceptable alternative
    delay_minutes: float  # CANCEL when cancelled


@dataclass(frozen=True)
class Plan:
    urgent: Placement
    moves: tuple[Move, ...]

    @property
    def key(self) -> tuple:
        return objective(self)

    @property
    def delays(self) -> tuple[float, ...]:
        return tuple(sorted((m.delay_minutes for m in self.moves), reverse=True))


def objective(plan: Plan) -> tuple:
    """The lexicographic objective of the module doc (smaller is better)."""
    return (len(plan.moves), plan.delays, plan.urgent.start,
            tuple(sorted((m.appointment_id, m.to.start if m.to else datetime.max.replace(tzinfo=plan.urgent.start.tzinfo))
                         for m in plan.moves)))


# --- placements ----------------------------------------------------------------------------------


def cover(problem: Problem, owner: str, start_slot_index: int, duration: timedelta) -> Optional[list[PlanSlot]]:
    """The owner's slots from ``start_slot_index`` covering ``duration`` back to back, or None."""
    slots = problem.by_owner.get(owner, [])
    first = slots[start_slot_index]
    end = first.start + duration
    taken = []
    cursor = first.start
    for slot in slots[start_slot_index:]:
        if cursor >= end:
            break
        if slot.start != cursor:
            return None
        taken.append(slot)
        cursor = slot.end
    return taken if cursor >= end else None


def _overlaps(start: datetime, end: datetime, intervals: Iterable[tuple]) -> bool:
    return any(s < end and start < e for s, e, *_rest in intervals)


def spans(problem: Problem, owners: Iterable[str], duration: timedelta, appointment_type: str, urgency: str,
          first_start: datetime, last_start: datetime) -> list[tuple[str, list[PlanSlot]]]:
    """Every (owner, slots) placement of the type in the start range, ignoring seats."""
    found = []
    for owner in sorted(owners):
        for index, slot in enumerate(problem.by_owner.get(owner, [])):
            if not first_start <= slot.start <= last_start:
                continue
            taken = cover(problem, owner, index, duration)
            if taken is None:
                continue
            if any(s.blocked or not problem.accepts(s, appointment_type, urgency) for s in taken):
                continue
            found.append((owner, taken))
    return found


def _placement(owner: str, taken: list[PlanSlot], duration: timedelta) -> Placement:
    return Placement(owner, taken[0].start, taken[0].start + duration, tuple(s.id for s in taken))


def _room(slot: PlanSlot, removed: Counter, added: Counter) -> int:
    return slot.capacity - slot.booked + removed[slot.id] - added[slot.id]


def alternatives(problem: Problem, appointment: PlanAppointment, removed: Counter, added: Counter,
                 moved_ids: frozenset[int] = frozenset(),
                 busy: Sequence[tuple[datetime, datetime]] = ()) -> list[tuple[float, Placement]]:
    """Where the moved visit may go given seats removed/added, best (least delay) first;
    ``moved_ids`` are the visits being moved (their old times no longer keep anyone busy)."""
    preferences = problem.preferences.get(appointment.patient_id, Preferences())
    owners = problem.allowed_owners.get(appointment.id, frozenset({appointment.owner}))
    first = max(appointment.start, problem.min_start)
    others = [(s, e) for s, e, a in problem.patient_busy.get(appointment.patient_id, ())
              if a != appointment.id and a not in moved_ids]
    found = []
    for owner, taken in spans(problem, owners, appointment.duration, appointment.appointment_type, "routine",
                              first, datetime.max.replace(tzinfo=first.tzinfo)):
        placement = _placement(owner, taken, appointment.duration)
        if owner == appointment.owner and placement.start == appointment.start:
            continue  # where it is now: not a move
        if not preferences.allow(taken[0]):
            continue
        if any(_room(s, removed, added) <= 0 for s in taken):
            continue
        if _overlaps(placement.start, placement.end, others) or _overlaps(placement.start, placement.end, busy):
            continue
        delay = (placement.start - appointment.start).total_seconds() / 60
        found.append((delay, placement))
    found.sort(key=lambda pair: (pair[0], pair[1].start, pair[1].owner))
    return found


# --- the search ----------------------------------------------------------------------------------


def _removal_sets(problem: Problem, taken: list[PlanSlot], limit: int) -> Iterable[tuple[int, ...]]:
    """Sets of movable occupants whose removal frees a seat in every slot, smallest first."""
    need = {s.id: max(0, s.booked - s.capacity + 1) for s in taken}
    occupants = sorted({a for s in taken for a in problem.occupants.get(s.id, ())})
    if any(need[s.id] > 0 and not problem.occupants.get(s.id) for s in taken):
        return  # full with something we cannot name (e.g. a seat held without an appointment): never freed
    movable = [a for a in occupants if problem.by_appointment[a].movable]
    for size in range(0, min(limit, len(movable)) + 1):
        for chosen in itertools.combinations(movable, size):
            counts = Counter(s for a in chosen for s in problem.by_appointment[a].slot_ids)
            if all(counts[slot_id] >= n for slot_id, n in need.items()):
                yield chosen


def solve(problem: Problem) -> Optional[Plan]:
    """The best plan by the module doc's objective, or None when none moves at most ``max_moves``."""
    best: Optional[Plan] = None
    for owner, taken in spans(problem, problem.urgent_owners, problem.urgent_duration, problem.urgent_type, "urgent",
                              problem.earliest, problem.latest_start):
        urgent = _placement(owner, taken, problem.urgent_duration)
        if _overlaps(urgent.start, urgent.end, problem.urgent_busy):
            continue
        limit = problem.max_moves if best is None else min(problem.max_moves, len(best.moves))
        for removed_ids in _removal_sets(problem, taken, limit):
            if best is not None and len(removed_ids) > len(best.moves):
                break
            plan = _assign(problem, urgent, removed_ids, best)
            if plan is not None and (best is None or plan.key < best.key):
                best = plan
    return best


def _assign(problem: Problem, urgent: Placement, removed_ids: tuple[int, ...], best: Optional[Plan]) -> Optional[Plan]:
    """The best alternatives for the removed visits (branch and bound); None when no
    assignment can beat ``best`` (same number moved, delays not worse)."""
    removed = Counter(s for a in removed_ids for s in problem.by_appointment[a].slot_ids)
    moved = [problem.by_appointment[a] for a in removed_ids]
    outer = best.delays if best is not None and len(best.moves) == len(moved) else None
    smallest = {}
    for appointment in moved:
        options = alternatives(problem, appointment, removed, Counter(urgent.slot_ids), frozenset(removed_ids))
        smallest[appointment.id] = options[0][0] if options else CANCEL
    found: list[tuple[tuple[float, ...], list[Move]]] = []

    def cut(bound: tuple[float, ...]) -> bool:
        # ties with the outer best stay in: an earlier urgent start may still win the comparison
        return bool(found and bound >= found[0][0]) or (outer is not None and bound > outer)

    def dfs(index: int, chosen: list[Move], seats: Counter, busy: dict[int, list[tuple[datetime, datetime]]]) -> None:
        fixed = [m.delay_minutes for m in chosen]
        if index == len(moved):
            delays = tuple(sorted(fixed, reverse=True))
            if not cut(delays):
                found[:] = [(delays, list(chosen))]
            return
        appointment = moved[index]
        options: list[tuple[float, Optional[Placement]]] = list(alternatives(
            problem, appointment, removed, seats, frozenset(removed_ids), busy.get(appointment.patient_id, ())))
        options.append((CANCEL, None))
        rest = [smallest[a.id] for a in moved[index + 1:]]
        for delay, placement in options:
            if cut(tuple(sorted(fixed + [delay] + rest, reverse=True))):
                break  # options come in order of delay: every later one is cut as well
            move = Move(appointment.id, appointment.patient_id, placement, delay)
            if placement is None:
                dfs(index + 1, chosen + [move], seats, busy)
                continue
            taken = {**busy, appointment.patient_id: busy.get(appointment.patient_id, []) + [(placement.start, placement.end)]}
            dfs(index + 1, chosen + [move], seats + Counter(placement.slot_ids), taken)

    dfs(0, [], Counter(urgent.slot_ids), {})
    if not found:
        return None
    return Plan(urgent, tuple(sorted(found[0][1], key=lambda m: m.appointment_id)))


# --- brute force (the reference the tests prove ``solve`` against) -------------------------------


def brute_force(problem: Problem) -> Optional[Plan]:
    """Every urgent placement × every subset of movable visits × every combination of
    alternatives, each checked from scratch by re-counting seats.  Exponential: small days only."""
    best: Optional[Plan] = None
    movable = [a for a in problem.appointments if a.movable]
    for owner, taken in spans(problem, problem.urgent_owners, problem.urgent_duration, problem.urgent_type, "urgent",
                              problem.earliest, problem.latest_start):
        urgent = _placement(owner, taken, problem.urgent_duration)
        if _overlaps(urgent.start, urgent.end, problem.urgent_busy):
            continue
        for size in range(0, min(problem.max_moves, len(movable)) + 1):
            for subset in itertools.combinations(movable, size):
                choices = []
                for appointment in subset:
                    choices.append(_every_place(problem, appointment) + [(CANCEL, None)])
                for combination in itertools.product(*choices):
                    moves = tuple(Move(a.id, a.patient_id, p, d) for a, (d, p) in zip(subset, combination))
                    plan = Plan(urgent, tuple(sorted(moves, key=lambda m: m.appointment_id)))
                    if feasible(problem, plan) and (best is None or plan.key < best.key):
                        best = plan
    return best


def _every_place(problem: Problem, appointment: PlanAppointment) -> list[tuple[float, Placement]]:
    """Every start of an allowed owner's slot, not earlier than the visit, with no seat check."""
    owners = problem.allowed_owners.get(appointment.id, frozenset({appointment.owner}))
    found = []
    for owner in owners:
        for index, slot in enumerate(problem.by_owner.get(owner, [])):
            taken = cover(problem, owner, index, appointment.duration)
            if taken is not None:
                placement = _placement(owner, taken, appointment.duration)
                found.append(((placement.start - appointment.start).total_seconds() / 60, placement))
    return found


def feasible(problem: Problem, plan: Plan) -> bool:
    """Whether a plan is allowed, checked from first principles (no shortcut of the search)."""
    urgent = plan.urgent
    if urgent.owner not in problem.urgent_owners or not problem.earliest <= urgent.start <= problem.latest_start:
        return False
    slots = [problem.by_id[s] for s in urgent.slot_ids]
    if any(s.blocked or not problem.accepts(s, problem.urgent_type, "urgent") for s in slots):
        return False
    if _overlaps(urgent.start, urgent.end, problem.urgent_busy):
        return False
    moved_ids = {m.appointment_id for m in plan.moves}
    if len(plan.moves) > problem.max_moves:
        return False
    load = Counter()
    for appointment in problem.appointments:
        if appointment.id not in moved_ids:
            load.update(appointment.slot_ids)
    load.update(urgent.slot_ids)
    visits: dict[int, list[tuple[datetime, datetime]]] = {}
    for appointment in problem.appointments:
        if appointment.id not in moved_ids:
            visits.setdefault(appointment.patient_id, []).append((appointment.start, appointment.end))
    for move in plan.moves:
        appointment = problem.by_appointment[move.appointment_id]
        if not appointment.movable:
            return False
        if move.to is None:
            continue
        target = move.to
        taken = [problem.by_id[s] for s in target.slot_ids]
        if target.owner not in problem.allowed_owners.get(appointment.id, frozenset({appointment.owner})):
            return False
        if target.start < appointment.start or target.start < problem.min_start:
            return False
        if target.owner == appointment.owner and target.start == appointment.start:
            return False
        if any(s.blocked or not problem.accepts(s, appointment.appointment_type, "routine") for s in taken):
            return False
        if not problem.preferences.get(appointment.patient_id, Preferences()).allow(taken[0]):
            return False
        load.update(target.slot_ids)
        visits.setdefault(appointment.patient_id, []).append((target.start, target.end))
    for patient_id, intervals in visits.items():
        outside = [(s, e) for s, e, a in problem.patient_busy.get(patient_id, ())
                   if a not in problem.by_appointment]
        every = sorted(intervals + outside)
        if any(every[i][1] > every[i + 1][0] for i in range(len(every) - 1)):
            return False
    for slot_id, count in load.items():
        slot = problem.by_id[slot_id]
        # seats booked by visits outside the problem stay booked
        outside = slot.booked - len(problem.occupants.get(slot_id, ()))
        if count + outside > slot.capacity:
            return False
    return True
