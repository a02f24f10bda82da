"""Prometheus metrics shared by the engine, the plugin host and the daemon.

prometheus_client is the reference implementation of the exposition format;
one registry per process, so two engines in one test process keep their own
figures.
"""
from __future__ import annotations

import threading
from bisect import bisect_left
from typing import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.metrics_core import Metric


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        # what /metrics and the console show: this registry, or more (the daemon's child process)
        self.exposed = self.registry
        r = self.registry
        self.plugin_errors = Counter(
            "slotengine_plugin_errors_total", "Plugin hook calls that raised", ["plugin", "hook"], registry=r
        )
        self.plugin_seconds = LeanHistogram(
            "slotengine_plugin_seconds", "Time spent in plugin hook calls", ["plugin", "hook"], registry=r
        )
        self.messages_received = Counter(
            "slotengine_messages_received_total", "Inbound HL7 messages received", ["feed"], registry=r
        )
        self.messages_acked = Counter(
            "slotengine_messages_acknowledged_total", "Acknowledgements sent", ["feed", "code"], registry=r
        )
        self.messages_applied = Counter(
            "slotengine_messages_applied_total", "Inbound messages applied", ["feed"], registry=r
        )
        self.messages_parked = Counter(
            "slotengine_messages_parked_total", "Inbound messages parked with an error", ["feed"], registry=r
        )
        self.queue_depth = Gauge(
            "slotengine_queue_depth", "Stored messages waiting to be applied", registry=r
        )
        self.ack_seconds = Histogram(
            "slotengine_ack_seconds", "Receipt to acknowledgement", ["feed"], registry=r,
            buckets=(0.001, 0.002, 0.005, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 1, 5),
        )
        self.batches_redone = Counter(
            "slotengine_batches_redone_total",
            "Batches of inbound messages undone and applied again with savepoints, after a failure", registry=r
        )
        self.apply_seconds = Histogram(
            "slotengine_apply_seconds", "Time to apply one message", ["feed"], registry=r,
            buckets=(0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5),
        )
        self.job_runs = Counter(
            "slotengine_job_runs_total", "Timed job runs", ["job", "outcome"], registry=r
        )
        self.outbox_messages = Counter(
            "slotengine_outbox_messages_total", "Outbox items handled by channel sweeps",
            ["channel", "kind", "outcome"], registry=r,
        )
        self.storage_failures = Counter(
            "slotengine_storage_failures_total", "Messages that could not be stored", ["feed"], registry=r
        )


class CombinedRegistry:
    """A registry's metrics merged with families reported by another process.

    Same-named families become one (Prometheus refuses a name twice); samples
    with the same labels are added, except ``_created`` timestamps."""

    def __init__(self, own: CollectorRegistry, others: Callable[[], Iterable[Metric]]):
        self.own = own
        self.others = others

    def collect(self) -> Iterable[Metric]:
        merged: dict[str, Metric] = {}
        for family in [*self.own.collect(), *self.others()]:
            found = merged.get(family.name)
            if found is None:
                found = merged[family.name] = Metric(family.name, family.documentation, family.type, family.unit)
            index = {(s.name, tuple(sorted(s.labels.items()))): i for i, s in enumerate(found.samples)}
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                if key not in index:
                    index[key] = len(found.samples)
                    found.samples.append(sample)
                elif not sample.name.endswith("_created"):
                    kept = found.samples[index[key]]
                    found.samples[index[key]] = kept._replace(value=kept.value + sample.value)
        return list(merged.values())


class LeanHistogram:
    """A labelled histogram, exposed as ``prometheus_client``'s is, that costs a third as
    much to observe: the bucket found by bisection and counted in the observing thread's own
    list, where ``Histogram.observe`` takes two locks.  Every change runs each plugin's hook
    and times it: a dozen observations for every message applied."""

    def __init__(self, name: str, documentation: str, labelnames: Iterable[str], *, registry: CollectorRegistry,
                 buckets: Iterable[float] = Histogram.DEFAULT_BUCKETS):
        self.name, self.documentation, self.labelnames = name, documentation, tuple(labelnames)
        self.bounds = tuple(float(b) for b in buckets if b != float("inf"))
        self._children: dict[tuple[str, ...], _LeanChild] = {}
        self._lock = threading.Lock()
        registry.register(self)

    def labels(self, *values: str) -> "_LeanChild":
        key = tuple(str(value) for value in values)
        if len(key) != len(self.labelnames):
            raise ValueError(f"{self.name}: labels {self.labelnames}, given {key}")
        with self._lock:
            child = self._children.get(key)
            if child is None:
                child = self._children[key] = _LeanChild(self.bounds)
        return child

    def describe(self) -> list[Metric]:
        return [HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)]

    def collect(self) -> list[Metric]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        with self._lock:
            children = list(self._children.items())
        for key, child in children:
            counts, total = child.read()
            cumulative, running = [], 0
            for bound, count in zip((*self.bounds, float("inf")), counts):
                running += count
                cumulative.append((_bound_text(bound), running))
            family.add_metric(list(key), cumulative, total)
        return [family]


class _LeanChild:
    """Counts kept per thread, each list written by its own thread only: no lock per
    observation.  A reader sums them (an observation may show in a bucket a moment before
    it shows in the sum, as with ``prometheus_client``, which locks each separately).
    Threads come and go (HTTP requests, job pools): once there are many lists, those of
    threads that have ended are folded into one."""

    __slots__ = ("_bounds", "_by_thread", "_ended", "_lock")

    #: lists kept before those of ended threads are folded together
    FOLD_AT = 32

    def __init__(self, bounds: tuple[float, ...]):
        self._bounds = bounds
        self._by_thread: dict[int, list] = {}  # thread id -> bucket counts, +Inf last, then the sum
        self._ended = self._zeros()
        self._lock = threading.Lock()

    def _zeros(self) -> list:
        return [0] * (len(self._bounds) + 1) + [0.0]

    def observe(self, amount: float) -> None:
        counts = self._by_thread.get(threading.get_ident())
        if counts is None:
            counts = self._own_counts()
        counts[bisect_left(self._bounds, amount)] += 1  # the first bucket whose bound is >= amount ("le")
        counts[-1] += amount

    def _own_counts(self) -> list:
        with self._lock:  # a thread id reused by a new thread takes its predecessor's counts on
            if len(self._by_thread) >= self.FOLD_AT:
                alive = {thread.ident for thread in threading.enumerate()}
                for ident in [ident for ident in self._by_thread if ident not in alive]:
                    self._ended = [a + b for a, b in zip(self._ended, self._by_thread.pop(ident))]
            return self._by_thread.setdefault(threading.get_ident(), self._zeros())

    def read(self) -> tuple[list[int], float]:
        with self._lock:
            every = [self._ended, *(list(counts) for counts in self._by_thread.values())]
        totals = [sum(column) for column in zip(*every)]
        return totals[:-1], float(totals[-1])


def _bound_text(bound: float) -> str:
    """A bucket's ``le`` label as prometheus_client writes it (``0.005``, ``1.0``, ``+Inf``)."""
    return "+Inf" if bound == float("inf") else repr(float(bound))
