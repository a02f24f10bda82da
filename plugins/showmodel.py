"""Will the patient come?  A logistic regression a scheduler can read, and the
arithmetic of an overbooking decision.  Pure Python, no database: the
``noshow`` plugin feeds it rows and stores what it answers.

The model::

    logit P(show) = b0 + b1 * log(1 + earlier no-shows) + b2 * log(1 + late cancellations)
                  + b3 * log(1 + days booked ahead) + type, weekday and time-of-day terms

Every term is one line in an explanation ("2 earlier no-shows: -1.32").  A
new site starts from ``PRIOR`` (a show rate near 85 %, earlier no-shows the
strongest signal, long lead times and first visits somewhat worse); fitting
maximises the likelihood of the site's own history minus
``prior_weight / 2 * sum((b - prior) ** 2)``, so a handful of visits leave the
prior almost untouched and a few thousand outweigh it.

Fitting is Newton's method (iteratively reweighted least squares) on visits
grouped by identical feature vectors -- lead time counts in whole days, the
other features are small integers or flags -- which gives exactly the same
likelihood as one row per visit with far fewer rows: a year of a busy clinic
is a few thousand groups, fitted in well under a second without numpy.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Mapping, Optional, Sequence

#: Appointment types with a term of their own; "general" is the baseline.
TYPES = ("new_patient", "follow_up", "procedure", "emergency")

FEATURES: tuple[str, ...] = (
    "intercept", "prior_no_shows", "late_cancellations", "lead_time",
    *TYPES, "monday", "friday", "early", "late_afternoon",
)

#: Where a site without history starts (and what a small history is pulled towards).
PRIOR: dict[str, float] = {
    "intercept": 2.2,
    "prior_no_shows": -1.2,
    "late_cancellations": -0.5,
    "lead_time": -0.25,
    "new_patient": -0.3,
    "follow_up": 0.0,
    "procedure": 0.3,
    "emergency": 1.0,
    "monday": -0.1,
    "friday": -0.15,
    "early": -0.1,
    "late_afternoon": -0.2,
}

EARLY_BEFORE_MINUTE = 9 * 60  # clinic-local 09:00
LATE_FROM_MINUTE = 15 * 60  # clinic-local 15:00
_TYPE_WORDS = {"new_patient": "first visit", "follow_up": "follow-up visit", "procedure": "procedure",
               "emergency": "urgent visit"}


@dataclass(frozen=True)
class Visit:
    """What the model knows about one appointment."""

    appointment_type: str
    lead_days: int  # whole days between booking and the visit
    weekday: int  # clinic-local, 0 = Monday
    local_minute: int  # clinic-local minutes after midnight
    prior_no_shows: int = 0
    prior_late_cancellations: int = 0


def vector(visit: Visit) -> tuple[float, ...]:
    """The visit's feature values in ``FEATURES`` order."""
    return (
        1.0,
        math.log1p(visit.prior_no_shows),
        math.log1p(visit.prior_late_cancellations),
        math.log1p(max(visit.lead_days, 0)),
        *(1.0 if visit.appointment_type == t else 0.0 for t in TYPES),
        1.0 if visit.weekday == 0 else 0.0,
        1.0 if visit.weekday == 4 else 0.0,
        1.0 if visit.local_minute < EARLY_BEFORE_MINUTE else 0.0,
        1.0 if visit.local_minute >= LATE_FROM_MINUTE else 0.0,
    )


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def describe(feature: str, visit: Visit) -> str:
    """The feature of this visit in words, for staff."""
    if feature == "prior_no_shows":
        return _plural(visit.prior_no_shows, "earlier no-show")
    if feature == "late_cancellations":
        return _plural(visit.prior_late_cancellations, "late cancellation")
    if feature == "lead_time":
        return f"booked {_plural(visit.lead_days, 'day')} ahead"
    if feature in _TYPE_WORDS:
        return _TYPE_WORDS[feature]
    if feature in ("monday", "friday"):
        return f"on a {feature.title()}"
    if feature == "early":
        return f"before {EARLY_BEFORE_MINUTE // 60:02d}:00"
    if feature == "late_afternoon":
        return f"from {LATE_FROM_MINUTE // 60:02d}:00"
    return feature


def _sigmoid(z: float) -> float:
    if z >= 0:
        return 1.0 / (1.0 + math.exp(-z))
    e = math.exp(z)
    return e / (1.0 + e)


def _log1pexp(z: float) -> float:
    return z + math.log1p(math.exp(-z)) if z > 0 else math.log1p(math.exp(z))


@dataclass(frozen=True)
class Estimate:
    probability: float
    logit: float
    reasons: list[dict]  # the largest contributions, strongest first
    features: dict[str, float]


def estimate(coefficients: Mapping[str, float], visit: Visit, *, top: int = 3) -> Estimate:
    """Show probability of ``visit`` and the terms that moved it most from the baseline."""
    x = vector(visit)
    beta = [float(coefficients.get(name, 0.0)) for name in FEATURES]
    logit = sum(b * v for b, v in zip(beta, x))
    contributions = [(FEATURES[j], beta[j] * x[j]) for j in range(1, len(FEATURES)) if x[j] and beta[j]]
    contributions.sort(key=lambda pair: -abs(pair[1]))
    reasons = [{"feature": name, "text": describe(name, visit), "effect": round(effect, 3),
                "direction": "raises" if effect > 0 else "lowers"}
               for name, effect in contributions[:top] if abs(effect) >= 0.005]
    return Estimate(_sigmoid(logit), logit, reasons, dict(zip(FEATURES, x)))


def reasons_text(reasons: Sequence[dict]) -> str:
    """``2 earlier no-shows (lowers, -0.83); first visit (lowers, -0.30)``"""
    return "; ".join(f"{r['text']} ({r['direction']}, {r['effect']:+.2f})" for r in reasons) or "no notable factor"


# --- fitting -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Fit:
    coefficients: dict[str, float]
    standard_errors: dict[str, float]
    sample_size: int
    no_shows: int
    groups: int
    iterations: int
    converged: bool
    log_loss: float  # mean negative log-likelihood per visit of the history, at the fit


def _cholesky(a: list[list[float]]) -> list[list[float]]:
    n = len(a)
    lower = [[0.0] * n for _ in range(n)]
    for i in range(n):
        for j in range(i + 1):
            s = a[i][j] - sum(lower[i][k] * lower[j][k] for k in range(j))
            if i == j:
                if s <= 0:
                    raise ArithmeticError("the information matrix is not positive definite")
                lower[i][i] = math.sqrt(s)
            else:
                lower[i][j] = s / lower[j][j]
    return lower


def _solve(lower: list[list[float]], b: Sequence[float]) -> list[float]:
    n = len(b)
    y = [0.0] * n
    for i in range(n):
        y[i] = (b[i] - sum(lower[i][k] * y[k] for k in range(i))) / lower[i][i]
    x = [0.0] * n
    for i in reversed(range(n)):
        x[i] = (y[i] - sum(lower[k][i] * x[k] for k in range(i + 1, n))) / lower[i][i]
    return x


def fit(history: Iterable[tuple[Visit, bool]], *, prior: Optional[Mapping[str, float]] = None,
        prior_weight: float = 10.0, max_iterations: int = 50, tolerance: float = 1e-9) -> Fit:
    """Fit the coefficients to ``(visit, showed)`` pairs, shrunk towards ``prior``.

    ``prior_weight`` is the L2 penalty: the pull towards the prior equals the
    evidence of very roughly ``prior_weight / 0.13`` visits per coefficient
    (0.13 being the information one visit carries at an 85 % show rate).
    """
    if prior_weight <= 0:
        raise ValueError("prior_weight must be positive (it keeps a small history near the prior)")
    base = [float((prior or PRIOR).get(name, 0.0)) for name in FEATURES]
    k = len(FEATURES)
    counts: dict[tuple[float, ...], list[int]] = {}
    for visit, showed in history:
        cell = counts.setdefault(vector(visit), [0, 0])
        cell[0] += 1
        cell[1] += 1 if showed else 0
    # sparse rows: most features of a visit are 0
    groups = [([(j, v) for j, v in enumerate(x) if v], n, s) for x, (n, s) in counts.items()]
    sample = sum(n for _x, n, _s in groups)
    shows = sum(s for _x, _n, s in groups)

    def objective(beta: Sequence[float]) -> float:
        total = 0.0
        for x, n, s in groups:
            eta = sum(v * beta[j] for j, v in x)
            total += s * eta - n * _log1pexp(eta)
        return total - prior_weight / 2 * sum((b - b0) ** 2 for b, b0 in zip(beta, base))

    beta = list(base)
    current = objective(beta)
    iterations, converged = 0, False
    information: list[list[float]] = []
    while iterations < max_iterations:
        iterations += 1
        gradient = [-prior_weight * (b - b0) for b, b0 in zip(beta, base)]
        information = [[prior_weight if i == j else 0.0 for j in range(k)] for i in range(k)]
        for x, n, s in groups:
            p = _sigmoid(sum(v * beta[j] for j, v in x))
            residual, weight = s - n * p, n * p * (1 - p)
            for a, (i, vi) in enumerate(x):
                gradient[i] += residual * vi
                row = information[i]
                for j, vj in x[: a + 1]:
                    row[j] += weight * vi * vj
        for i in range(k):
            for j in range(i):
                information[j][i] = information[i][j]
        step = _solve(_cholesky(information), gradient)
        scale = 1.0
        while True:  # Newton steps can overshoot far from the optimum: halve until the objective rises
            trial = [b + scale * d for b, d in zip(beta, step)]
            value = objective(trial)
            if value >= current - 1e-12 or scale < 1e-6:
                break
            scale /= 2
        beta, current = trial, value
        if max(abs(scale * d) for d in step) < tolerance:
            converged = True
            break
    inverse_diagonal = [_solve(_cholesky(information), [1.0 if i == j else 0.0 for i in range(k)])[j]
                        for j in range(k)]
    log_likelihood = current + prior_weight / 2 * sum((b - b0) ** 2 for b, b0 in zip(beta, base))
    return Fit(
        coefficients={name: round(b, 6) for name, b in zip(FEATURES, beta)},
        standard_errors={name: round(math.sqrt(v), 6) for name, v in zip(FEATURES, inverse_diagonal)},
        sample_size=sample, no_shows=sample - shows, groups=len(groups), iterations=iterations,
        converged=converged, log_loss=round(-log_likelihood / sample, 6) if sample else 0.0,
    )


# --- overbooking arithmetic ---------------------------------------------------------------


@dataclass(frozen=True)
class Budget:
    """How much a block of a provider's time may be asked to absorb."""

    max_load: float = 1.0  # expected patient-minutes / seat-minutes of the block
    max_overtime_minutes: float = 15.0  # expected minutes of work beyond the block's seat-minutes
    max_expected_in_slot: float = 1.5  # expected patients in the double-booked slot
    max_extra_per_slot: int = 1  # seats above a slot's capacity


@dataclass(frozen=True)
class Attendee:
    probability: float  # of being there (1 for a patient who has arrived)
    minutes: int
    appointment_id: Optional[int] = None


def work_distribution(attendees: Sequence[Attendee]) -> dict[int, float]:
    """Probability of each total of patient-minutes, patients showing independently."""
    distribution = {0: 1.0}
    for attendee in attendees:
        p = min(max(attendee.probability, 0.0), 1.0)
        following: dict[int, float] = {}
        for total, q in distribution.items():
            following[total] = following.get(total, 0.0) + q * (1 - p)
            following[total + attendee.minutes] = following.get(total + attendee.minutes, 0.0) + q * p
        distribution = following
    return distribution


def expected_overtime(attendees: Sequence[Attendee], seat_minutes: int) -> float:
    """E[max(0, minutes of the patients who come - seat_minutes)]."""
    return sum(q * (total - seat_minutes) for total, q in work_distribution(attendees).items() if total > seat_minutes)


def _r(value: float) -> float:
    return round(value, 4)


def judge_overbook(*, block: Sequence[Attendee], seat_minutes: int, slot_occupants: Sequence[Attendee],
                   extra_seat: int, new: Attendee, budget: Budget) -> dict:
    """Whether one more patient fits a full slot, with every number it used.

    ``block`` are the appointments already in the block (the slot's occupants
    among them), ``seat_minutes`` what the block can see without overtime,
    ``extra_seat`` which seat above the slot's capacity this would be (1: the
    first).  Checks, in order: extra seats, expected patients in the slot,
    expected load of the block, expected overtime."""
    after = [*block, new]
    slot_expected_before = sum(a.probability for a in slot_occupants)
    decision = {
        "seat_minutes": seat_minutes,
        "appointments": [{"appointment_id": a.appointment_id, "show_probability": _r(a.probability),
                          "minutes": a.minutes} for a in block],
        "new_show_probability": _r(new.probability),
        "new_minutes": new.minutes,
        "expected_present_before": _r(sum(a.probability for a in block)),
        "expected_present_after": _r(sum(a.probability for a in after)),
        "expected_minutes_after": _r(sum(a.probability * a.minutes for a in after)),
        "load_limit_minutes": _r(seat_minutes * budget.max_load),
        "expected_overtime_minutes": _r(expected_overtime(after, seat_minutes)),
        "overtime_limit_minutes": budget.max_overtime_minutes,
        "slot_occupants": [{"appointment_id": a.appointment_id, "show_probability": _r(a.probability)}
                           for a in slot_occupants],
        "slot_expected_before": _r(slot_expected_before),
        "slot_expected_after": _r(slot_expected_before + new.probability),
        "slot_limit": budget.max_expected_in_slot,
        "extra_seat": extra_seat,
        "extra_seat_limit": budget.max_extra_per_slot,
    }
    if extra_seat > budget.max_extra_per_slot:
        why = f"the slot already has {extra_seat - 1} extra seat(s) (limit {budget.max_extra_per_slot})"
    elif decision["slot_expected_after"] > budget.max_expected_in_slot:
        why = (f"{decision['slot_expected_after']:.2f} patients expected in the slot "
               f"(limit {budget.max_expected_in_slot:.2f})")
    elif decision["expected_minutes_after"] > decision["load_limit_minutes"]:
        why = (f"{decision['expected_minutes_after']:.1f} expected patient-minutes in the block "
               f"(limit {decision['load_limit_minutes']:.1f})")
    elif decision["expected_overtime_minutes"] > budget.max_overtime_minutes:
        why = (f"{decision['expected_overtime_minutes']:.1f} minutes of expected overtime "
               f"(limit {budget.max_overtime_minutes:.1f})")
    else:
        why = ""
    decision["allowed"] = not why
    decision["reason"] = why or (
        f"{decision['expected_present_after']:.2f} patients expected in the block "
        f"({decision['expected_minutes_after']:.1f} of {seat_minutes} minutes), "
        f"{decision['expected_overtime_minutes']:.1f} minutes of expected overtime; "
        f"the slot's patients show with {slot_expected_before:.2f} in all")
    return decision
