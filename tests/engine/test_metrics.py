"""engine.metrics.LeanHistogram is exposed exactly as prometheus_client's Histogram."""
from __future__ import annotations

import threading

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from engine.metrics import LeanHistogram

BOUNDS = [float(b) for b in Histogram.DEFAULT_BUCKETS if b != float("inf")]


def exposition(registry: CollectorRegistry) -> list[str]:
    return [line for line in generate_latest(registry).decode().splitlines() if "_created" not in line]


@given(st.lists(st.tuples(st.sampled_from(["noshow", "reminders"]),
                          st.one_of(st.sampled_from(BOUNDS), st.floats(0, 100, allow_nan=False))), max_size=200))
def test_the_same_exposition_as_prometheus_clients_histogram(observations):
    reference, lean = CollectorRegistry(), CollectorRegistry()
    expected = Histogram("slotengine_plugin_seconds", "Time", ["plugin", "hook"], registry=reference)
    measured = LeanHistogram("slotengine_plugin_seconds", "Time", ["plugin", "hook"], registry=lean)
    for plugin, seconds in observations:
        expected.labels(plugin, "slotengine_schedule_changed").observe(seconds)
        measured.labels(plugin, "slotengine_schedule_changed").observe(seconds)
    assert exposition(lean) == exposition(reference)


def test_no_observation_is_lost_between_threads():
    registry = CollectorRegistry()
    histogram = LeanHistogram("x_seconds", "x", ["plugin"], registry=registry)
    child = histogram.labels("p")

    def observe():
        for _ in range(20_000):
            child.observe(0.003)

    threads = [threading.Thread(target=observe) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert registry.get_sample_value("x_seconds_count", {"plugin": "p"}) == 80_000
    assert registry.get_sample_value("x_seconds_bucket", {"plugin": "p", "le": "0.005"}) == 80_000


def test_lists_of_ended_threads_are_folded_and_still_counted(monkeypatch):
    """Thread ids are usually reused once a thread ends; where they are not (each new
    thread a new id, as simulated here), the lists of ended threads are folded together."""
    from types import SimpleNamespace

    from engine import metrics

    ids, alive, local = iter(range(1, 10**6)), set(), threading.local()

    def get_ident():
        if not hasattr(local, "ident"):
            local.ident = next(ids)
        return local.ident

    monkeypatch.setattr(metrics, "threading", SimpleNamespace(
        get_ident=get_ident, Lock=threading.Lock,
        enumerate=lambda: [SimpleNamespace(ident=ident) for ident in list(alive)]))
    registry = CollectorRegistry()
    child = LeanHistogram("x_seconds", "x", ["plugin"], registry=registry).labels("p")

    def request():
        alive.add(get_ident())
        for _ in range(3):
            child.observe(0.2)
        alive.discard(get_ident())

    for _ in range(200):  # an HTTP server's thread per request
        thread = threading.Thread(target=request)
        thread.start()
        thread.join()
    assert len(child._by_thread) <= child.FOLD_AT
    assert registry.get_sample_value("x_seconds_count", {"plugin": "p"}) == 600
    assert registry.get_sample_value("x_seconds_sum", {"plugin": "p"}) == pytest.approx(120.0)
