"""The agent's metrics (controller/metrics.py) read as prometheus_client writes them.

The agent writes the text exposition itself (importing prometheus_client cost it 1.8 MB
of RSS); prometheus_client, a test dependency here, is the reference: same metrics, same
operations, same text, except its `_created` series, which the agent does not write.
"""

from __future__ import annotations

import re
import threading
import urllib.request
from typing import Any

import prometheus_client as pc
import pytest
from flowcni.controller import metrics as m
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.parser import text_string_to_metric_families


def _without_created(text: str) -> str:
    return "".join(line + "\n" for line in text.splitlines()
                   if not re.match(r"(# (HELP|TYPE) )?\w+_created\b", line))


def _fill(mod: Any, registry: Any) -> None:
    counter = mod.Counter("t_events_total", "Events \\ applied\nby kind", ["kind", "op"],
                          registry=registry)
    plain = mod.Counter("t_resyncs_total", "Re-lists", registry=registry)
    hist = mod.Histogram("t_seconds", "Latency", ["command"], registry=registry,
                         buckets=(.005, .01, 1, 2.5))
    plain_hist = mod.Histogram("t_plain_seconds", "Plain", registry=registry, buckets=(.1, 1))
    mod.Histogram("t_unused_seconds", "Never observed", ["x"], registry=registry)
    counter.labels("Pod", "put").inc()
    counter.labels("Pod", "put").inc(2)
    counter.labels('we"ird\\', "del\n").inc()
    plain.inc()
    for v in (0.001, 0.005, 0.2, 3.0, 1e9):
        hist.labels("ADD").observe(v)
    hist.labels("DEL").observe(0.5)
    plain_hist.observe(0.05)


class _Gauges(m.Collector):
    def __init__(self, family: type) -> None:
        self.family = family

    def collect(self):  # type: ignore[no-untyped-def]
        g = self.family("t_flows", "Flows by table", labels=["table"])
        g.add_metric(["Classifier"], 3)
        g.add_metric(["Output"], 12345678)
        yield g
        yield self.family("t_connected", "Up", value=1)


def test_exposition_is_prometheus_clients_without_created() -> None:
    ours = m.CollectorRegistry()
    _fill(m, ours)
    ours.register(_Gauges(m.GaugeMetricFamily))
    ref = pc.CollectorRegistry()
    _fill(pc, ref)
    ref.register(_Gauges(GaugeMetricFamily))  # type: ignore[arg-type]
    want = _without_created(pc.generate_latest(ref).decode())
    assert m.exposition(ours).decode() == want


def test_counters_and_histograms_refuse_misuse() -> None:
    reg = m.CollectorRegistry()
    c = m.Counter("u_total", "x", ["a"], registry=reg)
    with pytest.raises(ValueError):
        c.inc()  # it has labels
    with pytest.raises(ValueError):
        c.labels("1", "2")
    with pytest.raises(ValueError):
        c.labels("1").inc(-1)


def test_counts_from_many_threads_add_up() -> None:
    reg = m.CollectorRegistry()
    c = m.Counter("v_total", "x", ["a"], registry=reg)
    h = m.Histogram("v_seconds", "x", registry=reg, buckets=(1,))

    def work() -> None:
        for _ in range(2000):
            c.labels("k").inc()
            h.observe(0.5)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    got = {s.name + str(s.labels): s.value
           for f in text_string_to_metric_families(m.exposition(reg).decode())
           for s in f.samples}
    assert got["v_total{'a': 'k'}"] == 16000
    assert got["v_seconds_count{}"] == 16000 and got["v_seconds_sum{}"] == 8000


def test_served_over_http() -> None:
    class State(m.StateCollector):
        def __init__(self) -> None:
            super().__init__(lambda: {"Classifier": 4}, lambda: True, lambda: 0, lambda: 7)

    reg_before = list(m.REGISTRY._collectors)
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = m.serve(f"127.0.0.1:{port}", State())
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            assert r.headers["Content-Type"] == m.CONTENT_TYPE
            text = r.read().decode()
    finally:
        srv.shutdown()
        srv.server_close()
        m.REGISTRY._collectors[:] = reg_before
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    assert fams["flowcni_flows"].samples[0].labels == {"table": "Classifier"}
    assert fams["flowcni_flows"].samples[0].value == 4
    assert fams["flowcni_datastore_applied_revision"].samples[0].value == 7
    assert "flowcni_cni_request_seconds" in fams and "flowcni_datastore_events" in fams


def test_the_agent_does_not_import_prometheus_client() -> None:
    import json
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-c", "import json, sys, flowcni.controller.agent; "
                          "print(json.dumps(sorted(sys.modules)))"],
                         capture_output=True, text=True, timeout=120, check=True)
    loaded = json.loads(out.stdout)
    assert [x for x in loaded if x.split(".")[0] in ("prometheus_client", "wsgiref")] == []
