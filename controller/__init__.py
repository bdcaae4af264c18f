"""flowcni.controller: the node agent and its control surfaces."""

import warnings

# python-ovs probes for eventlet (to detect monkey patching; we never patch),
# and importing eventlet prints a deprecation banner on every agent start.
warnings.filterwarnings("ignore", message="\nEventlet is deprecated")
