"""bench/agent_scale.py --quick: the scale bench runs end to end on both datastores.

The figures themselves are the bench's business (no wall-time assertions
here); what is checked is that every measurement happened and holds
together: OVS holds exactly the flows the agent wants, the ping ran through
the restart and lost no more than it sent, the changes and the burst were
applied.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_agent_scale_quick_prints_every_figure() -> None:
    prefix = os.environ.get("FLOWCNI_TEST_PREFIX", "fct") + "q"
    p = subprocess.run([sys.executable, str(REPO / "bench" / "agent_scale.py"), "--quick",
                        "--prefix", prefix], capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout + p.stderr[-3000:]
    lines = [json.loads(x) for x in p.stdout.splitlines() if x.startswith("{")]
    for ds in ("sqlite", "kubernetes"):
        mine = [x for x in lines if x.get("datastore") == ds]
        size, restart, change, burst = mine
        assert size["flows"] == size["desired_flows"] > 3000, size
        assert 0 < size["agent_rss_mb"] and 0 < size["full_sync_s"] <= size["time_to_synced_s"]
        assert restart["ping_sent"] > 10 and 0 <= restart["restart_lost_packets"] \
            <= restart["ping_sent"] and restart["restart_s"] > 0, restart
        # the losses are named, and the kill and the re-sync fall inside the ping
        assert len(restart["lost_seqs"]) == restart["restart_lost_packets"], restart
        assert restart["unanswered_at_stop"] in (0, 1), restart
        assert 1 < restart["kill_at_seq"] <= restart["synced_at_seq"] < restart["ping_sent"], \
            restart
        assert change["changes"] == 10 and 0 < change["change_p50_ms"] <= change["change_p99_ms"]
        assert burst["burst"] == 100 and burst["watch_burst_s"] > 0, burst
        assert isinstance(burst["rss_growth_mb"], float)
    assert "loadavg" in lines[-1]
    leftovers = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert f"{prefix}as" not in leftovers
