"""Prometheus metrics shared by the engine, the plugin host and the daemon.

prometheus_client is the reference implementation of the exposition format;
one registry per process, so two engines in one test process keep their own
figures.
"""
from __future__ import annotations

from typing import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
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
        self.plugin_seconds = Histogram(
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
