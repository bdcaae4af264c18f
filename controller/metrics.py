"""Prometheus metrics of the agent, in one registry, served on a loopback address by default.

Gauges that mirror state (flows per table, connection) are computed when
scraped, from the objects that own that state, so they cannot drift.

The few metric kinds the agent uses (counters and histograms with labels,
gauges computed at scrape time) and the text exposition format (0.0.4) are
written here rather than taken from prometheus_client: importing that
package loads 31 modules (its WSGI server, urllib.request, its platform and
process collectors...), 1.8 MB of the agent's RSS, for about 100 lines of
what the agent uses. The output is what prometheus_client writes for the
same metrics, without its `_created` series (a scraper of the text format
reads them as separate gauges, and nothing here uses them).
"""

from __future__ import annotations

import math
import socket
import threading
from collections import Counter as Tally
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@dataclass(frozen=True)
class Sample:
    name: str
    labels: dict[str, str]
    value: float


class MetricFamily:
    """One metric's HELP, TYPE and samples, as a scrape produces them."""

    def __init__(self, name: str, documentation: str, typ: str) -> None:
        self.name, self.documentation, self.type = name, documentation, typ
        self.samples: list[Sample] = []


class GaugeMetricFamily(MetricFamily):
    """A gauge computed at scrape time: one value, or one per `labels` values."""

    def __init__(self, name: str, documentation: str, value: float | None = None,
                 labels: Sequence[str] | None = None) -> None:
        super().__init__(name, documentation, "gauge")
        self._labelnames = tuple(labels or ())
        if value is not None:
            self.add_metric([], value)

    def add_metric(self, labels: Sequence[str], value: float) -> None:
        self.samples.append(Sample(self.name, dict(zip(self._labelnames, labels, strict=True)),
                                   value))


class Collector:
    """Something the registry asks for metric families at each scrape."""

    def collect(self) -> Iterable[MetricFamily]:
        raise NotImplementedError


class CollectorRegistry:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._collectors: list[Collector] = []

    def register(self, collector: Collector) -> None:
        with self._lock:
            self._collectors.append(collector)

    def collect(self) -> Iterator[MetricFamily]:
        with self._lock:
            collectors = list(self._collectors)
        for c in collectors:
            yield from c.collect()


class _Metric(Collector):
    """A counter or histogram, with children per label values (`labels()`)."""

    typ = ""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str] = (),
                 registry: CollectorRegistry | None = None) -> None:
        self.name, self.documentation = name, documentation
        self.labelnames = tuple(labelnames)
        self._lock = threading.Lock()
        self._children: dict[tuple[str, ...], Any] = {}
        if not self.labelnames:
            self._children[()] = self._child()
        if registry is not None:
            registry.register(self)

    def _child(self) -> Any:
        raise NotImplementedError

    def labels(self, *values: str) -> Any:
        if len(values) != len(self.labelnames):
            raise ValueError(f"{self.name}: labels {self.labelnames}, got {values}")
        key = tuple(str(v) for v in values)
        with self._lock:
            child = self._children.get(key)
            if child is None:
                child = self._children[key] = self._child()
            return child

    def _unlabelled(self) -> Any:
        if self.labelnames:
            raise ValueError(f"{self.name} has labels {self.labelnames}: use labels()")
        return self._children[()]

    def _items(self) -> list[tuple[dict[str, str], Any]]:
        with self._lock:
            return [(dict(zip(self.labelnames, k, strict=True)), c)
                    for k, c in self._children.items()]


class _CounterValue:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.value = 0.0

    def inc(self, amount: float = 1) -> None:
        if amount < 0:
            raise ValueError("a counter only goes up")
        with self._lock:
            self.value += amount


class Counter(_Metric):
    """A monotonic count; its name ends in `_total`, as the exposition wants."""

    typ = "counter"

    def _child(self) -> _CounterValue:
        return _CounterValue()

    def inc(self, amount: float = 1) -> None:
        self._unlabelled().inc(amount)

    def collect(self) -> Iterator[MetricFamily]:
        fam = MetricFamily(self.name, self.documentation, self.typ)
        fam.samples = [Sample(self.name, labels, c.value) for labels, c in self._items()]
        yield fam


class _HistogramValue:
    def __init__(self, bounds: tuple[float, ...]) -> None:
        self._lock = threading.Lock()
        self.bounds = bounds
        self.counts = [0] * len(bounds)  # per bucket, not cumulative
        self.sum = 0.0

    def observe(self, value: float) -> None:
        # the last bound is +Inf; NaN falls there too (it compares below nothing)
        i = next((i for i, b in enumerate(self.bounds) if value <= b), len(self.bounds) - 1)
        with self._lock:
            self.counts[i] += 1
            self.sum += value

    def snapshot(self) -> tuple[list[int], float]:
        with self._lock:
            return list(self.counts), self.sum


class Histogram(_Metric):
    """Observations counted in cumulative buckets (`le`), with their count and sum."""

    typ = "histogram"

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str] = (),
                 registry: CollectorRegistry | None = None,
                 buckets: Sequence[float] = (.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5,
                                             10)) -> None:
        bounds = sorted(float(b) for b in buckets)
        if bounds[-1] != math.inf:
            bounds.append(math.inf)
        self.bounds = tuple(bounds)
        super().__init__(name, documentation, labelnames, registry)

    def _child(self) -> _HistogramValue:
        return _HistogramValue(self.bounds)

    def observe(self, value: float) -> None:
        self._unlabelled().observe(value)

    def collect(self) -> Iterator[MetricFamily]:
        fam = MetricFamily(self.name, self.documentation, self.typ)
        for labels, h in self._items():
            counts, total = h.snapshot()
            acc = 0
            for bound, n in zip(self.bounds, counts, strict=True):
                acc += n
                fam.samples.append(Sample(f"{self.name}_bucket",
                                          {**labels, "le": _number(bound)}, acc))
            fam.samples.append(Sample(f"{self.name}_count", labels, acc))
            fam.samples.append(Sample(f"{self.name}_sum", labels, total))
        yield fam


def _number(v: float) -> str:
    """A sample value as Go's (and so Prometheus' and prometheus_client's) text has it."""
    v = float(v)
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    if math.isnan(v):
        return "NaN"
    s = repr(v)
    point = s.find(".")
    if v > 0 and "e" not in s and point > 6:  # Go writes an exponent from 1e7 on
        digits = (s[:point] + s[point + 1:]).rstrip("0")
        mantissa = digits[0] + ("." + digits[1:] if len(digits) > 1 else "")
        return f"{mantissa}e+{point - 1:02d}"
    return s


def _label_value(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def exposition(registry: CollectorRegistry) -> bytes:
    """The registry's metrics in Prometheus' text format 0.0.4."""
    out = []
    for fam in registry.collect():
        doc = fam.documentation.replace("\\", "\\\\").replace("\n", "\\n")
        out.append(f"# HELP {fam.name} {doc}\n# TYPE {fam.name} {fam.type}\n")
        for s in fam.samples:
            labels = ",".join(f'{k}="{_label_value(v)}"' for k, v in s.labels.items())
            out.append(f"{s.name}{{{labels}}} {_number(s.value)}\n" if labels
                       else f"{s.name} {_number(s.value)}\n")
    return "".join(out).encode()


REGISTRY = CollectorRegistry()

CNI_REQUESTS = Histogram(
    "flowcni_cni_request_seconds", "CNI requests handled by the agent, by command and result",
    ["command", "result"], registry=REGISTRY,
    buckets=(.005, .01, .02, .05, .1, .2, .5, 1, 2, 5))
POLICY_REALIZATION = Histogram(
    "flowcni_policy_realization_seconds",
    "From reading a datastore change to its flows committed in OVS",
    registry=REGISTRY, buckets=(.001, .005, .01, .02, .05, .1, .2, .5, 1, 2))
DATASTORE_EVENTS = Counter("flowcni_datastore_events_total", "Datastore changes applied",
                           ["kind", "op"], registry=REGISTRY)
DATASTORE_CHANGE_FAILURES = Counter(
    "flowcni_datastore_change_failures_total",
    "Datastore changes skipped because applying them failed even alone (agent status "
    "lists the objects)", ["kind"], registry=REGISTRY)
DATASTORE_RESYNCS = Counter("flowcni_datastore_resyncs_total",
                            "Full lists of the datastore (start-up, re-list)", registry=REGISTRY)
OF_RECONNECTS = Counter("flowcni_openflow_connections_total",
                        "OpenFlow connections made to the bridge", registry=REGISTRY)
FLOW_REPAIRS = Counter("flowcni_flow_repairs_total",
                       "Flows re-installed or removed by the periodic drift check",
                       ["kind"], registry=REGISTRY)
STALE_DATAPATH_FLOWS = Counter(
    "flowcni_stale_datapath_flows_total",
    "Cached datapath flows whose actions the installed tables no longer give (still wrong "
    "after a revalidation round), found and deleted by the datapath guard",
    ["trigger"], registry=REGISTRY)
DATAPATH_CHECK = Histogram(
    "flowcni_datapath_check_seconds",
    "One datapath cache check (dump, re-translation of the flows in scope, repair)",
    ["trigger"], registry=REGISTRY, buckets=(.001, .005, .01, .02, .05, .1, .2, .5, 1, 2, 5))


class StateCollector(Collector):
    """Scrape-time gauges from callbacks the agent registers."""

    def __init__(self, flows_by_table: Callable[[], dict[str, int]],
                 connected: Callable[[], bool], bundle_errors: Callable[[], int],
                 revision: Callable[[], int],
                 services: Callable[[], tuple[int, int, int]] | None = None) -> None:
        """services: (Services, endpoints over all their ports, groups) the proxy programs."""
        self.flows_by_table, self.connected = flows_by_table, connected
        self.bundle_errors, self.revision = bundle_errors, revision
        self.services = services

    def collect(self) -> Any:
        g = GaugeMetricFamily("flowcni_flows", "Flows the agent keeps in OVS, by table",
                              labels=["table"])
        for table, n in sorted(self.flows_by_table().items()):
            g.add_metric([table], n)
        yield g
        yield GaugeMetricFamily("flowcni_openflow_connected",
                                "1 while the OpenFlow connection to the bridge is up",
                                value=1 if self.connected() else 0)
        yield GaugeMetricFamily("flowcni_bundle_errors", "Bundles OVS refused since start",
                                value=self.bundle_errors())
        yield GaugeMetricFamily("flowcni_datastore_applied_revision",
                                "Datastore revision the flows reflect", value=self.revision())
        if self.services is not None:
            n_svc, n_ep, n_groups = self.services()
            yield GaugeMetricFamily("flowcni_services", "Services the proxy programs",
                                    value=n_svc)
            yield GaugeMetricFamily("flowcni_service_endpoints",
                                    "Endpoints over every Service port (group buckets)",
                                    value=n_ep)
            yield GaugeMetricFamily("flowcni_groups", "OpenFlow groups the agent keeps in OVS",
                                    value=n_groups)


class TenantCollector(Collector):
    """Per tenant network, at scrape time: its local pods and flows, and whether it is usable.

    `rows` gives (tenant, VNI, usable, local pods, flows) tuples (controller.tenants)."""

    def __init__(self, rows: Callable[[], list[tuple[str, int, bool, int, int]]]) -> None:
        self.rows = rows

    def collect(self) -> Any:
        up = GaugeMetricFamily("flowcni_tenant_ready", "1 if the tenant network is usable",
                               labels=["tenant", "vni"])
        pods = GaugeMetricFamily("flowcni_tenant_pods", "Pods of the tenant network on this "
                                 "node", labels=["tenant", "vni"])
        flows = GaugeMetricFamily("flowcni_tenant_flows", "Flows of the tenant network and its "
                                  "pods on this node", labels=["tenant", "vni"])
        for name, vni, ok, n_pods, n_flows in self.rows():
            up.add_metric([name, str(vni)], 1 if ok else 0)
            pods.add_metric([name, str(vni)], n_pods)
            flows.add_metric([name, str(vni)], n_flows)
        yield from (up, pods, flows)


class ClusterPolicyCollector(Collector):
    """Scrape-time gauges per cluster policy tier (Admin, Baseline) from the engine:
    policies, rules and the flows their rules hold on this node."""

    def __init__(self, per_tier: Callable[[], dict[str, dict[str, int]]]) -> None:
        self.per_tier = per_tier

    def collect(self) -> Any:
        fams = {k: GaugeMetricFamily(f"flowcni_cluster_policy_{k}", doc, labels=["tier"])
                for k, doc in (("policies", "Cluster policies, by tier"),
                               ("rules", "Rules of cluster policies, by tier"),
                               ("flows", "Flows of cluster policy rules on this node, by tier"))}
        for tier, counts in sorted(self.per_tier().items()):
            for k, fam in fams.items():
                fam.add_metric([tier], counts.get(k, 0))
        yield from fams.values()


def flows_per_table(flows: list[Any]) -> dict[str, int]:
    return dict(Tally(f.table for f in flows))


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, addr: tuple[str, int], registry: CollectorRegistry) -> None:
        self.registry = registry
        if ":" in addr[0]:
            self.address_family = socket.AF_INET6
        super().__init__(addr, _Handler)


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        body = exposition(self.server.registry)
        self.send_response(200)
        self.send_header("Content-Type", CONTENT_TYPE)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass  # one line per scrape is noise


def serve(address: str, collector: StateCollector, *more: Collector) -> ThreadingHTTPServer:
    """Start the /metrics HTTP server (every path answers) on a daemon thread."""
    REGISTRY.register(collector)
    for c in more:
        REGISTRY.register(c)
    host, _, port = address.rpartition(":")
    srv = _Server((host.strip("[]") or "127.0.0.1", int(port)), REGISTRY)
    threading.Thread(target=srv.serve_forever, name="metrics", daemon=True).start()
    return srv
