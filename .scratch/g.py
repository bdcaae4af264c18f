import time, sys
from flowcni.controller.dpcache import Unixctl, DatapathGuard, parse_dump
g = DatapathGuard(Unixctl(sys.argv[1]))
fl = g.dump()
print(len(fl), "flows", sum(f.post_conntrack for f in fl), "post-ct", g.datapath())
for f in fl[:3]: print(f.addresses(), f.post_conntrack, f.actions[:60])
r = g.check(None, post_ct_only=False, repair=False)
print(r.checked, r.lagging, len(r.stale), r.seconds)
for s in r.stale: print(s.describe()[:600])
