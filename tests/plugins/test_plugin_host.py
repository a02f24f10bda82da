"""The plugin host: registration, and each hook's failure policy with real plugins."""
from __future__ import annotations

import logging
from datetime import date, timedelta

import pytest
from sqlalchemy import create_engine, func, select
from sqlalchemy.orm import Session

from engine.errors import BookingVetoed
from engine.jobs import make_context
from engine.models import OutboxItem
from engine.plugin import hookimpl
from engine.plugin_host import UNGUARDED_HOOKS, PluginError, PluginHost, UnguardedHookFailed
from engine.requests import BookingRequest, SlotQuery
from engine.testing import DEMO_CLINIC
from tests.plugins.helpers import STAFF, Clinic


class Boom(Exception):
    pass


def host(*plugins, **kwargs) -> PluginHost:
    return PluginHost(builtins=(), discover=False, extra=list(plugins), **kwargs)


def errors(h: PluginHost, plugin: str, hook: str) -> float:
    return h.metrics.registry.get_sample_value("slotengine_plugin_errors_total", {"plugin": plugin, "hook": hook}) or 0


# --- registration -----------------------------------------------------------------------------


def test_a_misspelled_hook_fails_at_start_up_naming_the_plugin():
    class Typo:
        @hookimpl
        def slotengine_chek_booking(self, appointment):
            pass

    with pytest.raises(PluginError, match="typo"):
        host(("typo", Typo()))


def test_hook_wrappers_are_refused_because_the_host_calls_implementations_one_by_one():
    class Wrapper:
        @hookimpl(wrapper=True)
        def slotengine_after_change(self, change):
            return (yield)

    with pytest.raises(PluginError, match="wrapper"):
        host(("wrapping", Wrapper()))


def test_disabled_plugins_are_not_registered_but_listed():
    h = PluginHost(discover=False, disabled=["reminders", "nonexistent"])
    rows = {row["name"]: row for row in h.plugin_rows()}
    assert rows["reminders"]["enabled"] is False and rows["reminders"]["hooks"] == []
    assert rows["eligibility"]["enabled"] and rows["eligibility"]["origin"] == "builtin"
    assert "slotengine_check_booking" in rows["eligibility"]["hooks"]
    assert h.get("reminders") is None
    assert h.unknown_disabled == {"nonexistent"}


def test_a_plugin_refusing_its_settings_stops_start_up_with_its_name(slotengine_scheduler):
    slotengine_scheduler.plugins = PluginHost(discover=False)
    with pytest.raises(PluginError, match="'reminders'"):
        make_context(slotengine_scheduler, plugin_settings={"reminders": {"offsets_hourz": [1]}})


def test_configure_gives_each_plugin_its_own_section():
    seen = {}

    class One:
        @hookimpl
        def slotengine_configure(self, settings, context):
            seen["one"] = settings

    class Two:
        @hookimpl
        def slotengine_configure(self, settings):
            seen["two"] = settings

    host(("one", One()), ("two", Two())).configure({"one": {"a": 1}}, context=None)
    assert seen == {"one": {"a": 1}, "two": {}}


def test_registered_jobs_channels_and_routes_carry_their_plugin():
    class Vendor:
        @hookimpl
        def slotengine_register_jobs(self, register):
            register("vendor.sweep", lambda context: None, seconds=5)

        @hookimpl
        def slotengine_register_channels(self, register):
            register("sms", Channel("vendor"))

        @hookimpl
        def slotengine_register_http_routes(self, register):
            register("post", "/vendor/hook", lambda body, headers, query: (204, {}))

    class Builtin:
        @hookimpl(trylast=True)
        def slotengine_register_channels(self, register):
            register("sms", Channel("builtin"))
            register("email", Channel("builtin"))

    class Channel:
        def __init__(self, owner):
            self.owner = owner

        def send(self, message):
            pass

    h = host(("builtin", Builtin()), ("vendor", Vendor()))
    [job] = h.job_registrations()
    assert (job.plugin, job.job_id, job.seconds) == ("vendor", "vendor.sweep", 5)
    channels = h.channels()
    assert channels["sms"].owner == "vendor" and channels["email"].owner == "builtin"  # first registration wins
    [(method, path, handler, plugin)] = h.http_routes()
    assert (method, path, plugin) == ("POST", "/vendor/hook", "vendor")
    assert handler(b"", {}, {}) == (204, {})


def test_two_plugins_claiming_one_route_or_job_id_stop_start_up():
    def plugin(path):
        class P:
            @hookimpl
            def slotengine_register_http_routes(self, register):
                register("POST", path, lambda body, headers, query: (200, {}))

            @hookimpl
            def slotengine_register_jobs(self, register):
                register("same.id", lambda context: None, seconds=1)
        return P()

    h = host(("a", plugin("/x")), ("b", plugin("/x")))
    with pytest.raises(PluginError, match="already served"):
        h.http_routes()
    with pytest.raises(PluginError, match="already registered"):
        h.job_registrations()


def test_a_raising_registration_names_the_plugin():
    class Broken:
        @hookimpl
        def slotengine_register_channels(self, register):
            raise Boom("no SMTP host")

    with pytest.raises(PluginError, match="'broken'.*no SMTP host"):
        host(("broken", Broken())).channels()


# --- watchdog and timing ---------------------------------------------------------------------------


def calls_timed(h: PluginHost, plugin: str, hook: str) -> float:
    return h.metrics.registry.get_sample_value("slotengine_plugin_seconds_count", {"plugin": plugin, "hook": hook}) or 0


class Unguarded:
    """Just what ``schedule_changed`` needs of a session when it runs without savepoints."""

    info = {UNGUARDED_HOOKS: True}


@pytest.mark.parametrize("guarded", [True, False])
def test_the_call_running_is_named_by_stuck_calls_and_each_call_is_timed(guarded):
    seen = {}

    class Watched:
        def __init__(self, name):
            self.name = name

        @hookimpl
        def slotengine_schedule_changed(self, change):
            seen[self.name] = h.stuck_calls(longer_than=-1)

    h = host(("first", Watched("first")), ("second", Watched("second")))
    session = Session(create_engine("sqlite://")) if guarded else Unguarded()
    h.schedule_changed(session, None)
    h.schedule_changed(session, None)
    for name in ("first", "second"):
        assert [(c["plugin"], c["hook"]) for c in seen[name]] == [(name, "slotengine_schedule_changed")]
        assert calls_timed(h, name, "slotengine_schedule_changed") == 2
    assert h.stuck_calls(longer_than=-1) == []


def test_an_unguarded_failure_names_its_plugin_and_is_timed_and_no_longer_in_flight():
    class Failing:
        @hookimpl
        def slotengine_schedule_changed(self, change):
            raise Boom("plan")

    h = host(("failing", Failing()))
    with pytest.raises(UnguardedHookFailed) as raised:
        h.schedule_changed(Unguarded(), None)
    assert raised.value.plugin == "failing" and isinstance(raised.value.__cause__, Boom)
    assert calls_timed(h, "failing", "slotengine_schedule_changed") == 1
    assert h.stuck_calls(longer_than=-1) == []


def test_a_plugin_registered_after_the_first_call_is_called_too():
    class Counting:
        def __init__(self):
            self.changes = 0

        @hookimpl
        def slotengine_schedule_changed(self, change):
            self.changes += 1

    first, late = Counting(), Counting()
    h = host(("first", first))
    h.schedule_changed(Unguarded(), None)
    h.pm.register(late, name="late")
    h.schedule_changed(Unguarded(), None)
    h.pm.unregister(name="first")
    h.schedule_changed(Unguarded(), None)
    assert (first.changes, late.changes) == (2, 2)


# --- failure policies, on a real engine -------------------------------------------------------------


class Recorder:
    """A well-behaved plugin that records what it is called with."""

    def __init__(self):
        self.calls = []

    @hookimpl
    def slotengine_after_change(self, change):
        self.calls.append(("after", change.kind))

    @hookimpl
    def slotengine_schedule_changed(self, session, change):
        self.calls.append(("changed", change.kind))

    @hookimpl
    def slotengine_check_booking(self, action):
        self.calls.append(("check", action))


class Raiser:
    @hookimpl(tryfirst=True)
    def slotengine_after_change(self, change):
        raise Boom("notify")

    @hookimpl(tryfirst=True)
    def slotengine_schedule_changed(self, session, change, context):
        session.add(OutboxItem(channel="x", kind="raiser", due_at=context.clock.now() if context else change_time(),
                               payload={}, created_at=change_time()))
        session.flush()
        raise Boom("plan")

    @hookimpl(tryfirst=True)
    def slotengine_check_booking(self, appointment):
        raise Boom("eligibility service down")

    @hookimpl
    def slotengine_score_slot(self, candidate):
        raise Boom("score")

    @hookimpl
    def slotengine_patient_instructions(self, appointment):
        raise Boom("instructions")

    @hookimpl
    def slotengine_route_referral(self, referral):
        raise Boom("router")

    @hookimpl
    def slotengine_verify_coverage(self, coverages):
        raise Boom("clearinghouse timeout")

    @hookimpl
    def slotengine_staff_notice(self, session, notice):
        session.add(OutboxItem(channel="x", kind="raiser", due_at=change_time(), payload={}, created_at=change_time()))
        session.flush()
        raise Boom("notice")

    @hookimpl
    def slotengine_score_waitlist_entry(self, entry, slot):
        raise Boom("waitlist score")


def change_time():
    from engine.testing import CLOCK_START
    return CLOCK_START


@pytest.fixture
def recorder():
    return Recorder()


@pytest.fixture
def slotengine_plugins(recorder):
    return host(("recorder", recorder), ("raiser", Raiser()))


def test_a_raising_eligibility_check_holds_the_booking_for_review_and_others_still_run(
        slotengine_scheduler, recorder, slotengine_plugins, caplog):
    clinic = Clinic(slotengine_scheduler)
    patient = clinic.patient("P1")
    with caplog.at_level(logging.ERROR, logger="slotengine.plugins"):
        appointment = clinic.book(patient)
    assert appointment.status == "held"  # fails closed
    assert appointment.review_reason.startswith("raiser: raiser could not check this booking")
    assert ("check", "book") in recorder.calls  # the raiser did not cancel the others
    assert errors(slotengine_plugins, "raiser", "slotengine_check_booking") == 1
    assert any(getattr(r, "plugin", "") == "raiser" and r.hook == "slotengine_check_booking" for r in caplog.records)


def test_a_raising_schedule_changed_is_rolled_back_alone_and_the_change_commits(slotengine_scheduler, recorder,
                                                                                  slotengine_plugins):
    patient = Clinic(slotengine_scheduler).patient("P1")
    with slotengine_scheduler.sessions() as session:
        before = session.scalar(select(func.count()).select_from(OutboxItem))
    Clinic(slotengine_scheduler).book(patient)
    with slotengine_scheduler.sessions() as session:
        assert session.scalar(select(func.count()).select_from(OutboxItem)) == before  # its row rolled back
    assert ("changed", "held") in recorder.calls and ("after", "held") in recorder.calls
    assert errors(slotengine_plugins, "raiser", "slotengine_schedule_changed") >= 1
    assert errors(slotengine_plugins, "raiser", "slotengine_after_change") >= 1  # notifications fail open


def test_other_hooks_fail_open(slotengine_scheduler, slotengine_plugins):
    plugins = slotengine_plugins
    now = slotengine_scheduler.clock.now()
    query = SlotQuery("new_patient", now, now + timedelta(days=7), limit=3)
    assert len(slotengine_scheduler.free_slots(query)) == 3  # a raising scorer counts 0
    assert errors(plugins, "raiser", "slotengine_score_slot") >= 1
    with slotengine_scheduler.sessions() as session, session.begin():
        assert plugins.route_referral(session, {"specialty": "cardiology"}) is None  # next plugin asked
        plugins.staff_notice(session, {"team": "front_desk", "subject": "s", "text": "t"})
        assert session.scalar(select(func.count()).select_from(OutboxItem)) == 0
        verdict = plugins.verify_coverage(session, None, None, [], date(2026, 3, 3))
        assert verdict["outcome"] == "error" and "raiser" in verdict["findings"][0]  # fails closed
    assert plugins.patient_instructions(object(), "MAIN", "en", session=None) == []
    assert plugins.score_waitlist_entry(object(), object()) == 0
    for hook in ("slotengine_route_referral", "slotengine_staff_notice", "slotengine_verify_coverage",
                 "slotengine_patient_instructions", "slotengine_score_waitlist_entry"):
        assert errors(plugins, "raiser", hook) == 1, hook


def test_a_veto_refuses_the_booking_and_names_the_plugin(slotengine_scheduler):
    class Veto:
        @hookimpl
        def slotengine_check_booking(self, appointment, patient, action):
            return {"decision": "veto", "reason": "no MRI on Sundays"}

    slotengine_scheduler.plugins = host(("veto", Veto()))
    patient = Clinic(slotengine_scheduler).patient("P1")
    with pytest.raises(BookingVetoed, match="veto: no MRI on Sundays"):
        Clinic(slotengine_scheduler).book(patient)


def test_slot_scores_are_summed_and_reorder_free_slots(slotengine_scheduler):
    class Late:
        @hookimpl
        def slotengine_score_slot(self, candidate, query):
            return candidate.start.hour / 100

    slotengine_scheduler.plugins = host(("late", Late()))
    now = slotengine_scheduler.clock.now()
    found = slotengine_scheduler.free_slots(SlotQuery("new_patient", now, now + timedelta(days=1), limit=5))
    assert [c.score for c in found] == sorted((c.score for c in found), reverse=True)
    assert DEMO_CLINIC  # the demo clinic is what the scheduler fixture loaded


def test_route_referral_stops_at_the_first_answer(slotengine_scheduler):
    class First:
        @hookimpl(tryfirst=True)
        def slotengine_route_referral(self, session, referral):
            return {"waitlist": True}

    class Second:
        @hookimpl
        def slotengine_route_referral(self, session, referral):
            raise AssertionError("not asked")

    h = host(("second", Second()), ("first", First()))
    with slotengine_scheduler.sessions() as session:
        assert h.route_referral(session, {}) == {"waitlist": True, "plugin": "first"}


def test_book_request_through_a_bound_scheduler_notifies_after_commit(slotengine_scheduler, recorder,
                                                                     slotengine_plugins):
    patient = Clinic(slotengine_scheduler).patient("P2")
    slot = Clinic(slotengine_scheduler).slots("DRJONES")[0]
    with slotengine_scheduler.sessions() as session:
        view = slotengine_scheduler.within(session)
        with session.begin():
            view.book(BookingRequest(patient_id=patient.id, appointment_type="new_patient", slot_id=slot.id), STAFF)
            assert ("after", "held") not in recorder.calls
        view.notify_committed()
    assert ("after", "held") in recorder.calls


class Planner:
    """Writes one outbox row per change, as reminder plans do."""

    @hookimpl
    def slotengine_schedule_changed(self, session, change):
        session.add(OutboxItem(channel="planner", kind="plan", due_at=change_time(),
                               payload={"change": change.kind}, created_at=change_time()))
        session.flush()


@pytest.mark.parametrize("order", ["planner first", "raiser first"])
def test_the_work_of_plugins_that_succeed_is_kept_once_when_another_fails(slotengine_scheduler, order):
    from engine.service import Scheduler

    plugins = [("planner", Planner()), ("raiser", Raiser())]
    if order == "raiser first":
        plugins.reverse()
    scheduler = Scheduler(slotengine_scheduler.sessions, plugins=host(*plugins), clock=slotengine_scheduler.clock)
    patient = Clinic(scheduler).patient("P1")
    Clinic(scheduler).book(patient)
    with scheduler.sessions() as session:
        kinds = sorted((o.channel, o.payload["change"]) for o in session.scalars(select(OutboxItem)))
    # one row per change from the planner; none from the raiser (its savepoint rolled back)
    assert ("x", "held") not in kinds and all(channel == "planner" for channel, _ in kinds)
    assert len(kinds) == len(set(kinds)) and ("planner", "held") in kinds
