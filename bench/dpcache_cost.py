#!/usr/bin/env python3
"""Cost of one datapath-guard check (controller/dpcache.py) at N cached datapath flows.

A 1-node lab with two pods; one real TCP connection gives a post-conntrack
datapath flow, and N variants of its key (distinct destination addresses, same
mask) are added with `dpctl/add-flow`, each with the actions the tables give
(ofproto/trace), so they are valid cached flows the guard must re-translate.
The node's max-idle and max-revalidator are raised so the revalidator keeps
them while measured.

Figures: the median wall time of a full check (every flow behind conntrack:
dump + one ofproto/trace per flow, no repair needed), of a check targeted at
one address (what a policy change on one pod costs), and as the peer from the
same run, the bare `dpctl/dump-flows` over the same JSON-RPC connection (the
floor any cache check pays). One JSON line on stdout.

    python3 bench/dpcache_cost.py [--flows 1000] [--runs 5] [--prefix fcdc]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from typing import Any

from flowcni.controller.dpcache import DatapathGuard, Unixctl, parse_dump, traced_actions
from flowcni.lab.lab import Lab


def median_s(fn: Any, runs: int) -> tuple[float, Any]:
    times, last = [], None
    for _ in range(runs):
        t = time.perf_counter()
        last = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), last


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--flows", type=int, default=1000)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--prefix", default=os.environ.get("FLOWCNI_BENCH_PREFIX", "fcdc"))
    a = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("dpcache_cost: needs root (network namespaces, OVS)", file=sys.stderr)
        return 1
    lab = Lab(base=f"/run/flowcni-bench-{a.prefix}", prefix=f"{a.prefix}-")
    lab.down()
    out: dict[str, Any] = {"flows_wanted": a.flows}
    srv: subprocess.Popen[bytes] | None = None
    conn: subprocess.Popen[bytes] | None = None
    try:
        lab.up(nodes=1, encap="geneve")
        node = lab.node("node1")
        node.ovs.vsctl("set", "Open_vSwitch", ".", "other_config:max-idle=600000",
                       "other_config:max-revalidator=600000")
        lab.pod_add("a", "node1")
        b = lab.pod_add("b", "node1")
        srv = subprocess.Popen(lab.exec_argv("default/b", [
            sys.executable, "-c", "import socket;s=socket.socket();s.setsockopt(1,2,1);"
            "s.bind(('0.0.0.0',80));s.listen(64)\nwhile True: s.accept()[0].close()"]))
        time.sleep(0.5)
        # connections all along keep the real flow (and its recirculation id, which
        # the added flows share) alive
        conn = subprocess.Popen(lab.exec_argv("default/a", [
            sys.executable, "-c", "import socket,time\nwhile True:\n"
            f" socket.create_connection(('{b.ip}',80),2).close(); time.sleep(0.1)"]))
        time.sleep(0.5)
        ctl = Unixctl(os.path.join(node.ovs.rundir, "ovs-vswitchd.ctl"))
        guard = DatapathGuard(ctl)
        syn = next(f for f in guard.dump() if f.post_conntrack
                   and f.addresses()[1] == f"{b.ip}/32" and "ct(commit" in f.actions)
        dst = syn.addresses()[1]
        assert dst is not None and dst.endswith("/32"), f"destination not exact in {syn.key}"
        base_ip = dst[:-3]
        i = 0
        n_flows = 0
        while n_flows < a.flows and i < 4 * a.flows:
            # the revalidator drops some hand-added flows; add until N are cached
            for _ in range(a.flows - n_flows):
                ip = f"10.{100 + i // 65536 % 100}.{i // 256 % 256}.{i % 256}"
                i += 1
                key = re.sub(rf"ipv4\(src=([^,]*),dst={re.escape(base_ip)},",
                             rf"ipv4(src=\1,dst={ip},", syn.key)
                acts = traced_actions(ctl.call("ofproto/trace", guard.datapath(), key))
                ctl.call("dpctl/add-flow", key, acts or "drop")
            n_flows = len(parse_dump(ctl.call("dpctl/dump-flows", "-m", "--no-names")))
        out["datapath_flows"] = n_flows
        dump_s, _ = median_s(lambda: ctl.call("dpctl/dump-flows", "-m", "--no-names"),
                             a.runs)
        full_s, res = median_s(lambda: guard.check(None), a.runs)
        one_s, res1 = median_s(lambda: guard.check(frozenset({b.ip})), a.runs)
        out.update({
            "full_check_ms": round(full_s * 1000, 1), "full_checked": res.checked,
            "full_stale": len(res.stale), "per_flow_us": round(full_s / res.checked * 1e6, 1)
            if res.checked else None,
            "targeted_check_ms": round(one_s * 1000, 1), "targeted_checked": res1.checked,
            "dump_only_ms": round(dump_s * 1000, 1),
            "full_over_dump": round(full_s / dump_s, 1) if dump_s else None})
    finally:
        if conn is not None:
            conn.kill()
            conn.wait()
        if srv is not None:
            srv.kill()
            srv.wait()
        lab.down()
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
