"""Reproduce issue 14 in a 3-node lab (prefix fca); leaves the lab up with --keep."""
import json, subprocess, sys, time, threading
from flowcni.lab.lab import Lab, parse_ports
from tests.support.reach import start_server

lab = Lab(base="/run/flowcni-fca-x", prefix="fcax-")
keep = "--keep" in sys.argv
lab.down()
lab.up(nodes=3, encap="geneve")
st = lab.store()
for ns in ("default",):
    st.put("Namespace", "", ns, {"name": ns, "labels": {}})
a = lab.pod_add("a", "node1", "default", {"app": "a"})
b = lab.pod_add("b", "node2", "default", {"app": "b"}, parse_ports("echo=8080/TCP"))
c = lab.pod_add("c", "node3", "default", {"app": "c"})
srv = start_server(lab.exec_argv("default/b", []), ["8080"])
print("a", a.ip, "b", b.ip, "c", c.ip, flush=True)
PROBER = r"""
import socket, sys, time
ip = sys.argv[1]
while True:
    s = socket.socket(); s.settimeout(0.3)
    t = time.time()
    try:
        s.connect((ip, 8080)); ok = 1
    except OSError:
        ok = 0
    s.close()
    print(f"{t:.3f} {ok}", flush=True)
    time.sleep(0.025)
"""
log = open("/tmp/fca-probe.log", "w")
prober = subprocess.Popen(lab.exec_argv("default/c", [sys.executable, "-c", PROBER, b.ip]),
                          stdout=log, text=True)
def pol(name, spec):
    return {"spec": spec}
ALLOW = {"podSelector": {"matchLabels": {"app": "b"}},
         "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "c"}}}],
                      "ports": [{"protocol": "TCP", "port": 8080}]}]}
def seen(want, timeout=5.0):
    t0 = time.time(); log.flush()
    while time.time() - t0 < timeout:
        ls = [l for l in open("/tmp/fca-probe.log").read().splitlines() if not l.startswith("#")]
        if ls and float(ls[-1].split()[0]) > t0 and ls[-1].split()[1] == want:
            return
        time.sleep(0.02)
    print("never saw", want, flush=True)
def mark(s):
    print(f"{time.time():.3f} {s}", flush=True); log.write(f"# {time.time():.3f} {s}\n"); log.flush()
for i in range(5):
    st.put("NetworkPolicy", "default", "allow-b-from-c", {"name": "allow-b-from-c", "namespace": "default", "spec": ALLOW})
    lab.wait_realized(); seen("1"); mark(f"applied {i}")
    st.delete("NetworkPolicy", "default", "allow-b-from-c")
    lab.wait_realized(); seen("1"); time.sleep(0.3); mark(f"deleted {i}")
st.put("Namespace", "", "other", {"name": "other", "labels": {}})
d = lab.pod_add("d", "node3", "other", {"app": "c"})
print("d", d.ip, flush=True)
dlog = open("/tmp/fca-probe-d.log", "w")
proberd = subprocess.Popen(lab.exec_argv("other/d", [sys.executable, "-c", PROBER, b.ip]), stdout=dlog, text=True)
time.sleep(1.0)
TEAM = {"podSelector": {"matchLabels": {"app": "b"}},
        "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": "x"}},
                               "podSelector": {"matchLabels": {"app": "c"}}}],
                     "ports": [{"protocol": "TCP", "port": "echo"}]}]}
st.put("NetworkPolicy", "default", "b-from-team-x", {"name": "b-from-team-x", "namespace": "default", "spec": TEAM})
lab.wait_realized(); time.sleep(1); mark("team-x applied")
st.put("Namespace", "", "other", {"name": "other", "labels": {"team": "x"}})
lab.wait_realized(); mark("labelled")
time.sleep(3); mark("end")
prober.kill(); log.close(); proberd.kill()
n2 = lab.node("node2")
open("/tmp/fca-dp.txt", "w").write(n2.ovs.appctl("dpctl/dump-flows", check=False) + "\n---\n" + n2.ovs.ofctl("dump-flows", "br-int", check=False))
# analyse
lines = open("/tmp/fca-probe.log").read().splitlines()
after = False; bad = 0
for l in lines:
    if l.startswith("# ") and "labelled" in l: after = True
    elif after and not l.startswith("#") and l.split()[1] == "1": bad += 1
print("c allowed after label:", bad, flush=True)
srv.kill()
if not keep:
    lab.down()
