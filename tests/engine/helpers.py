from engine.requests import Actor, Identifier, PatientRecord

STAFF = Actor("operator", "test-desk", "pytest")


def make_patient(scheduler, mrn: str = "MRN1", **fields):
    record = PatientRecord(identifiers=[Identifier(mrn, "HOSP", "MR")], family_name="Doe", given_name="Jane", **fields)
    return scheduler.register_patient(record, STAFF)


def provider_id(scheduler, code: str) -> int:
    from sqlalchemy import select
    from engine.models import Provider
    with scheduler.sessions() as s:
        return s.scalar(select(Provider.id).where(Provider.code == code))


def resource_id(scheduler, code: str) -> int:
    from sqlalchemy import select
    from engine.models import Resource
    with scheduler.sessions() as s:
        return s.scalar(select(Resource.id).where(Resource.code == code))
