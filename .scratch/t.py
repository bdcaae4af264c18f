import time, sys
from flowcni.controller.dpcache import Unixctl, DatapathGuard
u = Unixctl(sys.argv[1]); g = DatapathGuard(u)
t = time.perf_counter(); fl = g.dump(); print("dump", time.perf_counter() - t)
for f in fl[:8]:
    t = time.perf_counter(); tr = u.call("ofproto/trace", "ovs-netdev", f.key); print(f"{time.perf_counter() - t:.4f}", f.post_conntrack, tr.count("Datapath actions"))
t = time.perf_counter(); u.call("version"); print("version", time.perf_counter() - t)
