"""NUL characters in a placer's request, on both databases: PostgreSQL stores no NUL
in text, so the filler drops it from what it reads (as the mirror mapping does)
and books, or names the field it cannot read."""
from __future__ import annotations

from typing import Iterator

import pytest

from engine.requests import Identifier
from tests.engine.conftest import DATABASES, database_url
from tests.hl7.test_filler import Placer, code, dtm, errors, srm

NUL = "\\X00\\"  # HL7's escape for the byte


@pytest.fixture(params=DATABASES)
def slotengine_database_url(request, tmp_path) -> Iterator[str]:
    yield from database_url(request.param, tmp_path)


def test_a_request_with_nul_in_its_values_books_without_them(slotengine_scheduler):
    placer = Placer(slotengine_scheduler)
    booked = placer.answer(srm("S01", placer=f"P{NUL}1", start=dtm(9), extra=(f"NTE|1||Bring the{NUL} list",),
                               provider=f"DR{NUL}SMITH", mrn=f"MR{NUL}N1", duration=f"3{NUL}0"))
    assert (code(booked), errors(booked)) == ("AA", [])
    appointment = slotengine_scheduler.find_appointment(placer_id="P1^EHR")
    assert appointment is not None and appointment.notes == "Bring the list"
    assert (appointment.end - appointment.start).total_seconds() == 30 * 60
    patient = slotengine_scheduler.find_patient(_mrn("MRN1"))
    assert patient is not None and patient.id == appointment.patient_id


def test_a_nul_where_a_time_belongs_is_refused_naming_the_field(slotengine_scheduler):
    refused = Placer(slotengine_scheduler).answer(srm("S01", start=f"2026030309{NUL}00"))
    assert code(refused) == "AE"
    [(where, error_code, _app, _text)] = errors(refused)
    assert (where.split("^")[:3], error_code) == (["ARQ", "1", "11"], "102")


def _mrn(value: str):
    return [Identifier(value=value, authority="HOSP", type_code="MR")]
