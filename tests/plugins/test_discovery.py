"""Vendor discovery end to end: the sample vendor package, installed with
``pip install -e tests/plugins/sample_vendor``, is found through its entry point."""
from __future__ import annotations

from importlib.metadata import entry_points

import pytest

from engine.errors import BookingVetoed
from engine.jobs import make_context
from engine.plugin import ENTRY_POINT_GROUP
from engine.plugin_host import PluginHost
from engine.requests import BookingRequest
from tests.plugins.helpers import STAFF, Clinic

pytestmark = pytest.mark.skipif(
    not any(ep.name == "sample_vendor" for ep in entry_points(group=ENTRY_POINT_GROUP)),
    reason="run: pip install -e tests/plugins/sample_vendor",
)


@pytest.fixture
def slotengine_plugins():
    return PluginHost()  # discovery on, built-ins registered


def test_plugin_host_finds_the_vendor_through_its_entry_point(slotengine_plugins):
    rows = {row["name"]: row for row in slotengine_plugins.plugin_rows()}
    vendor = rows["sample_vendor"]
    assert vendor["origin"] == "entry point (slotengine-sample-vendor 0.1.0)"
    assert vendor["module"] == "slotengine_sample_vendor"
    assert "slotengine_check_booking" in vendor["hooks"] and vendor["enabled"]
    assert rows["eligibility"]["origin"] == "builtin"


def test_the_vendor_hooks_run(slotengine_scheduler, slotengine_plugins):
    context = make_context(slotengine_scheduler, plugin_settings={"sample_vendor": {"payer": "SAMPLE"},
                                                                  "eligibility": {}})
    clinic = Clinic(slotengine_scheduler)
    patient = clinic.patient("V1", payer="SAMPLE")
    slot = clinic.slots("DRSMITH")[0]
    with pytest.raises(BookingVetoed, match="sample_vendor"):
        slotengine_scheduler.book(BookingRequest(patient_id=patient.id, appointment_type="new_patient",
                                                 slot_id=slot.id, reason="sample-vendor-veto"), STAFF)
    appointment = clinic.book(patient, slot=slot)
    # its clearinghouse answered before the built-in payer rules, which know no payer SAMPLE
    assert appointment.status == "booked"
    assert appointment.eligibility["source"] == "sample_vendor" and appointment.eligibility["copay"] == 5.0
    routes = {(m, p): (h, plugin) for m, p, h, plugin in slotengine_plugins.http_routes()}
    handler, plugin = routes[("GET", "/sample/ping")]
    assert plugin == "sample_vendor" and handler(b"", {}, {}) == (200, {"pong": True})
    jobs = {job.job_id: job for job in slotengine_plugins.job_registrations()}
    assert jobs["sample_vendor.heartbeat"].func(context) == 1


def test_disabling_the_vendor_by_name(slotengine_scheduler):
    plugins = PluginHost(disabled=["sample_vendor"])
    slotengine_scheduler.plugins = plugins
    make_context(slotengine_scheduler, plugin_settings={})
    rows = {row["name"]: row for row in plugins.plugin_rows()}
    assert rows["sample_vendor"]["enabled"] is False
    assert plugins.get("sample_vendor") is None
    patient = Clinic(slotengine_scheduler).patient("V2", payer=None)
    appointment = slotengine_scheduler.book(BookingRequest(
        patient_id=patient.id, appointment_type="new_patient", slot_id=Clinic(slotengine_scheduler).slots("DRSMITH")[0].id,
        reason="sample-vendor-veto"), STAFF)
    assert appointment.status in ("booked", "held")  # no veto: the vendor is not there
