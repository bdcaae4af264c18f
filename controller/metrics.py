"""Prometheus metrics of the agent, in one registry, served on a loopback address by default.

Gauges that mirror state (flows per table, connection) are computed when
scraped, from the objects that own that state, so they cannot drift.
"""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

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


def serve(address: str, collector: StateCollector, *more: Collector) -> None:
    """Start the /metrics HTTP server (a daemon thread of prometheus_client)."""
    REGISTRY.register(collector)
    for c in more:
        REGISTRY.register(c)
    host, _, port = address.rpartition(":")
    start_http_server(int(port), addr=host or "127.0.0.1", registry=REGISTRY)
