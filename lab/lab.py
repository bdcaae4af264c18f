"""The embedded lab: nodes and pods as network namespaces on one machine.

A node is a netns with its own OVS and its own flowcni-agent. A pod is a
netns attached by running the real `flowcni` plugin executable with the
environment and stdin a container runtime gives it, so the lab exercises the
same path as a cluster. Everything the lab makes is named with its prefix
and recorded in its state file, and `down` removes all of it, including
leftovers of a lab that crashed half-way.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

from flowcni.cni import install as cni_install
from flowcni.ctl.client import AgentClient, AgentError
from flowcni.ctl.providers import NodeAgent
from flowcni.datastore.store import ClusterConfig, Store, StoreError
from flowcni.flows.services import PROXY_MODES
from flowcni.lab import netns
from flowcni.lab.netns import run
from flowcni.lab.ovs import OVS, kill_wait

DEFAULT_BASE = "/run/flowcni-lab"
NAME_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
UNDERLAY_NET = "192.168.77"  # lives only inside the lab's namespaces
UNDERLAY_PREFIX = 24
EXTERNAL_UNDERLAY_IP = f"{UNDERLAY_NET}.254"
EXTERNAL_IP = "198.51.100.1"  # the "internet" host, on the external namespace's lo
CNI_VERSION = "1.0.0"  # what Debian 12 runtimes (podman 4.3, containerd 1.6) accept


class LabError(RuntimeError):
    pass


@dataclass
class Node:
    name: str
    index: int
    netns: str
    pod_cidr: str
    node_ip: str
    rundir: str
    agent_pid: int = 0

    @property
    def ovs(self) -> OVS:
        return OVS(self.netns, os.path.join(self.rundir, "ovs"))

    @property
    def socket(self) -> str:
        return os.path.join(self.rundir, "agent", "cni.sock")

    @property
    def api_socket(self) -> str:
        return os.path.join(self.rundir, "agent", "api.sock")

    @property
    def conflist(self) -> str:
        return os.path.join(self.rundir, "flowcni.conflist")

    @property
    def agent_log(self) -> str:
        return os.path.join(self.rundir, "agent.log")


@dataclass
class Pod:
    name: str
    namespace: str
    node: str
    netns: str
    container_id: str
    ip: str = ""
    mac: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    ports: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ref(self) -> str:
        return f"{self.namespace}/{self.name}"


def validate_name(kind: str, name: str) -> str:
    if not NAME_RE.match(name) or len(name) > 63:
        raise LabError(f"{kind} name {name!r} is not a DNS-1123 label")
    return name


def parse_ports(s: str | None) -> list[dict[str, Any]]:
    """'http=80/TCP,dns=53/UDP' -> container ports (name, containerPort, protocol)."""
    out = []
    for part in filter(None, (s or "").split(",")):
        name, sep, rest = part.partition("=")
        num, _, proto = rest.partition("/")
        if not sep or not num.isdigit() or not 0 < int(num) < 65536:
            raise LabError(f"--ports: {part!r} is not name=port[/PROTOCOL]")
        proto = (proto or "TCP").upper()
        if proto not in ("TCP", "UDP", "SCTP"):
            raise LabError(f"--ports: {part!r}: protocol must be TCP, UDP or SCTP")
        out.append({"name": name, "containerPort": int(num), "protocol": proto})
    return out


def parse_labels(s: str | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for part in filter(None, (s or "").split(",")):
        k, sep, v = part.partition("=")
        if not sep or not k:
            raise LabError(f"--labels: {part!r} is not key=value")
        out[k.strip()] = v.strip()
    return out


class LabDatastore:
    """Where a lab's agents get their cluster from, and where the lab reports to it.

    The default is the embedded SQLite store every agent of the lab shares.
    Tests plug in others (a fake Kubernetes API server) through the same
    four hooks, so the lab drives agents the same way whatever feeds them.
    """

    def __init__(self, lab: Lab) -> None:
        self.lab = lab

    def agent_args(self, node: Node) -> list[str]:
        return ["--datastore", f"sqlite:{self.lab.store_path}", "--node-ip", node.node_ip]

    def node_added(self, node: Node) -> str:
        """Called after the node's agent is ready; returns its pod CIDR."""
        body = self.lab.store().get("Node", "", node.name)
        return body["podCIDR"] if body else ""

    def node_removed(self, node: Node) -> None:
        self.lab.store().delete("Node", "", node.name)

    def pod_put(self, pod: Pod) -> None:
        """What a kubelet reports to the API server: the pod, its labels and its IP."""
        self.lab.store().put("Pod", pod.namespace, pod.name, {
            "namespace": pod.namespace, "name": pod.name, "labels": pod.labels,
            "ip": pod.ip, "node": pod.node, "containerID": pod.container_id,
            "ports": pod.ports})

    def pod_deleted(self, pod: Pod) -> None:
        self.lab.store().delete("Pod", pod.namespace, pod.name)


class Lab:
    """A lab described by its state file under `base`."""

    def __init__(self, base: str | None = None, prefix: str | None = None,
                 datastore: Callable[[Lab], LabDatastore] = LabDatastore) -> None:
        self.base = base or os.environ.get("FLOWCNI_LAB_DIR", DEFAULT_BASE)
        self.prefix = prefix or os.environ.get("FLOWCNI_LAB_PREFIX", "fc-")
        self.state_path = os.path.join(self.base, "lab.json")
        self.bin_dir = os.path.join(self.base, "bin")
        self.datastore = datastore(self)
        # How long a started agent may take to sync (benches with huge tables raise it).
        self.ready_timeout = 30.0

    # -- state ----------------------------------------------------------------------

    @contextmanager
    def _locked(self) -> Iterator[dict[str, Any]]:
        os.makedirs(self.base, exist_ok=True)
        with open(os.path.join(self.base, "lab.lock"), "w") as lk:
            fcntl.flock(lk, fcntl.LOCK_EX)
            st = self._read()
            yield st
            tmp = self.state_path + ".tmp"
            with open(tmp, "w") as f:
                json.dump(st, f, indent=1)
            os.replace(tmp, self.state_path)

    def _read(self) -> dict[str, Any]:
        try:
            with open(self.state_path) as f:
                st: dict[str, Any] = json.load(f)
                return st
        except FileNotFoundError:
            return {"prefix": self.prefix, "nodes": [], "pods": [], "netns": []}

    def _netns_add(self, name: str) -> None:
        """Create a netns, recorded first: a crash between the two leaves a name `down`
        finds in the state (and deletes only if it exists), never an unknown netns."""
        if netns.exists(name):
            raise LabError(f"network namespace {name} already exists and is not this lab's")
        with self._locked() as st:
            st.setdefault("netns", [])
            if name not in st["netns"]:
                st["netns"].append(name)
        try:
            run(["ip", "netns", "add", name])
        except BaseException:
            self._forget_netns(name)  # not made (or someone else's by now): not ours to delete
            raise
        try:
            run(["ip", "-n", name, "link", "set", "lo", "up"])
        except BaseException:
            self._netns_del(name)
            raise

    def _netns_del(self, name: str) -> None:
        netns.delete(name)
        self._forget_netns(name)

    def _forget_netns(self, name: str) -> None:
        with self._locked() as st:
            st["netns"] = [n for n in st.get("netns", []) if n != name]

    def recorded_netns(self) -> list[str]:
        """Every netns this lab made and has not removed yet, from its state file."""
        st = self._read()
        names = list(st.get("netns", []))
        names += [n["netns"] for n in st["nodes"]] + [p["netns"] for p in st["pods"]]
        if "netns" not in st and os.path.exists(self.state_path):
            # A state file written before netns were recorded: its shared namespaces.
            prefix = st.get("prefix") or self.prefix
            names += [f"{prefix}underlay", f"{prefix}external"]
        return sorted(set(names))

    def nodes(self) -> list[Node]:
        return [Node(**n) for n in self._read()["nodes"]]

    def node(self, name: str) -> Node:
        for n in self.nodes():
            if n.name == name:
                return n
        raise LabError(f"no node {name!r} in the lab (have: {[n.name for n in self.nodes()]})")

    def pods(self) -> list[Pod]:
        return [Pod(**p) for p in self._read()["pods"]]

    def agents(self) -> list[NodeAgent]:
        """The nodes' agents, as flowctl's node providers give them."""
        return [NodeAgent(n.name, AgentClient(n.api_socket)) for n in self.nodes()]

    def pod(self, ref: str) -> Pod:
        ns, _, name = ref.rpartition("/")
        ns = ns or "default"
        for p in self.pods():
            if p.name == name and p.namespace == ns:
                return p
        raise LabError(f"no pod {ns}/{name} in the lab")

    # -- nodes ----------------------------------------------------------------------

    @property
    def store_path(self) -> str:
        return os.path.join(self.base, "store.db")

    def store(self) -> Store:
        if not os.path.exists(self.store_path):
            raise LabError(f"no lab in {self.base} (run `flowctl lab up`)")
        return Store(self.store_path)

    @property
    def underlay_ns(self) -> str:
        return f"{self.prefix}underlay"

    @property
    def external_ns(self) -> str:
        return f"{self.prefix}external"

    def up(self, nodes: int = 1, cluster_cidr: str = "10.244.0.0/16",
           node_cidr_size: int = 24, encap: str = "geneve", proxy: str = "flowcni"
           ) -> list[Node]:
        """Underlay, external host and N nodes; on any failure, nothing is left.

        `proxy` is the agents' --proxy (flowcni, or kube-proxy: the node's own DNAT,
        as a test or a user writes it); it is kept in the state file so nodes added
        and agents restarted later run in the same mode."""
        if proxy not in PROXY_MODES:
            raise LabError(f"--proxy {proxy!r}: one of {', '.join(PROXY_MODES)}")
        if nodes < 1:
            raise LabError("--nodes must be at least 1")
        if nodes > 200:
            raise LabError("--nodes: at most 200 (one underlay /24)")
        if self._read()["nodes"]:
            raise LabError(f"a lab is already up in {self.base}; run `flowctl lab down` first")
        try:
            cfg = ClusterConfig(cluster_cidr=cluster_cidr, node_cidr_size=node_cidr_size,
                                encap=encap).validate()
        except StoreError as e:
            raise LabError(str(e)) from e
        made = []
        try:
            os.makedirs(self.base, exist_ok=True)
            with self._locked() as st:
                st["proxy"] = proxy
            Store(self.store_path).set_cluster(cfg)
            cni_install.install(self.bin_dir)
            self._underlay_up()
            for _ in range(nodes):
                made.append(self.node_add())
        except BaseException:
            self.down()
            raise
        return made

    def _underlay_up(self) -> None:
        """A Linux bridge in its own netns joins the nodes; `external` plays the outside."""
        u = self.underlay_ns
        self._netns_add(u)
        run(["ip", "-n", u, "link", "add", "br0", "type", "bridge"])
        run(["ip", "-n", u, "link", "set", "br0", "up"])
        ext = self.external_ns
        self._netns_add(ext)
        self._uplink(ext, "x", EXTERNAL_UNDERLAY_IP)
        run(["ip", "-n", ext, "addr", "add", f"{EXTERNAL_IP}/32", "dev", "lo"])

    def _uplink(self, ns: str, tag: str, ip: str | None) -> None:
        """veth from `ns` (eth0) to the underlay bridge, optionally addressed."""
        u = self.underlay_ns
        peer = f"u{tag}"
        run(["ip", "-n", u, "link", "add", peer, "type", "veth", "peer", "name", "eth0",
             "netns", ns])
        run(["ip", "-n", u, "link", "set", peer, "master", "br0", "up"])
        run(["ip", "-n", ns, "link", "set", "eth0", "up"])
        if ip:
            run(["ip", "-n", ns, "addr", "add", f"{ip}/{UNDERLAY_PREFIX}", "dev", "eth0"])

    def node_add(self) -> Node:
        """One more node: netns, uplink, OVS (br-phy holds the node IP), agent."""
        taken = {n.index for n in self.nodes()}
        i = next(k for k in range(1, 254) if k not in taken)
        name = f"node{i}"
        node = Node(name, i, f"{self.prefix}{name}", "", f"{UNDERLAY_NET}.{i}",
                    os.path.join(self.base, name))
        with self._locked() as st:
            st["nodes"].append(asdict(node))
        self._netns_add(node.netns)
        self._uplink(node.netns, str(i), None)
        # eth0 belongs to br-phy; with the userspace datapath it is still a kernel
        # interface, and the node's stack would answer ARP for the node IP on it
        # with eth0's own MAC. A peer that learns that MAC sends tunnel packets
        # OVS does not take as its own, so the node's stack stays off eth0.
        run(["ip", "-n", node.netns, "link", "set", "eth0", "arp", "off"])
        run(["ip", "netns", "exec", node.netns, "sysctl", "-qw",
             "net.ipv6.conf.eth0.disable_ipv6=1"])
        node.ovs.start(tso=True)
        # The node IP sits on br-phy, so OVS's native tunnelling finds its route and
        # neighbours there; eth0 is br-phy's port to the underlay.
        node.ovs.vsctl("--may-exist", "add-br", "br-phy", "--", "set", "bridge", "br-phy",
                       "datapath_type=netdev", "--", "--may-exist", "add-port", "br-phy",
                       "eth0")
        run(["ip", "-n", node.netns, "addr", "add", f"{node.node_ip}/{UNDERLAY_PREFIX}",
             "dev", "br-phy"])
        run(["ip", "-n", node.netns, "link", "set", "br-phy", "up"])
        run(["ip", "-n", node.netns, "route", "add", "default", "via", EXTERNAL_UNDERLAY_IP])
        with open(node.conflist, "w") as f:
            json.dump({"cniVersion": CNI_VERSION, "name": "flowcni", "plugins": [
                {"type": "flowcni", "agentSocket": node.socket}]}, f, indent=1)
        node = self._start_agent(node)
        node.pod_cidr = self.datastore.node_added(node)
        with self._locked() as st:
            st["nodes"] = [asdict(node) if n["name"] == name else n for n in st["nodes"]]
        return node

    def node_del(self, name: str) -> Node:
        """Remove a node and its pods; the other agents drop its flows and routes."""
        node = self.node(name)
        for p in self.pods():
            if p.node == name:
                self._netns_del(p.netns)
                self.datastore.pod_deleted(p)
        if node.agent_pid:
            kill_wait(node.agent_pid, timeout=3)
        self.datastore.node_removed(node)
        node.ovs.stop()
        self._netns_del(node.netns)
        run(["ip", "-n", self.underlay_ns, "link", "del", f"u{node.index}"], check=False)
        shutil.rmtree(node.rundir, ignore_errors=True)
        with self._locked() as st:
            st["nodes"] = [n for n in st["nodes"] if n["name"] != name]
            st["pods"] = [p for p in st["pods"] if p["node"] != name]
        return node

    def wait_ready(self, node: Node, timeout: float = 30.0,
                   proc: subprocess.Popen[bytes] | None = None) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                last = f"agent exited with {proc.returncode}"
                break
            try:
                st = AgentClient(node.api_socket).status()
                if st.get("synced"):
                    return st
                last = st
            except AgentError as e:
                last = e
            time.sleep(0.1)
        try:
            with open(node.agent_log) as f:
                tail = "".join(f.readlines()[-12:])
        except OSError:
            tail = ""
        raise LabError(f"agent of {node.name} not ready after {timeout}s: {last}; "
                       f"its log ends:\n{tail}")

    def restart_agent(self, node_name: str, kill: bool = True) -> Node:
        """Kill the agent (SIGKILL by default) and start it again with the same arguments."""
        node = self.node(node_name)
        if node.agent_pid:
            if kill:
                try:
                    os.kill(node.agent_pid, 9)
                except ProcessLookupError:
                    pass
            kill_wait(node.agent_pid)
        return self._start_agent(node)

    def _start_agent(self, node: Node) -> Node:
        """Spawn the node's agent in its netns, record its pid, wait until it has synced."""
        log = open(node.agent_log, "ab")
        proc = subprocess.Popen(
            netns.exec_argv(node.netns, [
                sys.executable, "-m", "flowcni.controller.agent", "--node", node.name,
                *self.datastore.agent_args(node),
                "--ovsdb", node.ovs.remote, "--resync-period", "10",
                "--cni-socket", node.socket, "--api-socket", node.api_socket,
                "--state-dir", os.path.join(node.rundir, "agent"),
                "--datapath-type", "netdev",
                "--proxy", self._read().get("proxy", "flowcni")]),
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True)
        node.agent_pid = proc.pid
        with self._locked() as st:
            st["nodes"] = [asdict(node) if n["name"] == node.name else n for n in st["nodes"]]
        self.wait_ready(node, timeout=self.ready_timeout, proc=proc)
        return node

    def down(self) -> list[str]:
        """Remove every process, namespace and file of the lab; return what was removed.

        Only what the state file records is removed: another lab's namespaces,
        or anyone's that merely share the prefix, are left alone. A lab that
        crashed half-way recorded each namespace before making it."""
        removed = []
        st = self._read()
        for n in st["nodes"]:
            node = Node(**n)
            if node.agent_pid:
                kill_wait(node.agent_pid, timeout=3)
            node.ovs.stop()
        for name in self.recorded_netns():
            if netns.exists(name):
                netns.delete(name)
                removed.append(name)
        shutil.rmtree(self.base, ignore_errors=True)
        return removed

    # -- pods -----------------------------------------------------------------------

    def plugin_env(self, command: str, pod: Pod, ifname: str = "eth0") -> dict[str, str]:
        return {
            "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
            "CNI_COMMAND": command, "CNI_CONTAINERID": pod.container_id,
            "CNI_NETNS": os.path.join(netns.NETNS_DIR, pod.netns), "CNI_IFNAME": ifname,
            "CNI_PATH": self.bin_dir,
            "CNI_ARGS": f"IgnoreUnknown=1;K8S_POD_NAMESPACE={pod.namespace};"
                        f"K8S_POD_NAME={pod.name}",
        }

    def net_conf(self, node: Node) -> str:
        """The network config a runtime feeds the plugin: the conflist entry plus name/version."""
        with open(node.conflist) as f:
            conf = json.load(f)
        plugin = dict(conf["plugins"][0], name=conf["name"], cniVersion=conf["cniVersion"])
        return json.dumps(plugin)

    def run_plugin(self, command: str, pod: Pod, node: Node) -> dict[str, Any]:
        p = subprocess.run([os.path.join(self.bin_dir, "flowcni")], input=self.net_conf(node),
                           env=self.plugin_env(command, pod), capture_output=True, text=True,
                           timeout=120)
        out: dict[str, Any] = json.loads(p.stdout) if p.stdout.strip() else {}
        if p.returncode != 0:
            raise LabError(f"flowcni {command} for {pod.ref} failed (exit {p.returncode}): "
                           f"{out.get('msg') or p.stderr.strip()} (code {out.get('code')})")
        return out

    def pod_add(self, name: str, node_name: str, namespace: str = "default",
                labels: dict[str, str] | None = None,
                ports: list[dict[str, Any]] | None = None) -> Pod:
        validate_name("pod", name)
        validate_name("namespace", namespace)
        node = self.node(node_name)
        if any(p.name == name and p.namespace == namespace for p in self.pods()):
            raise LabError(f"pod {namespace}/{name} already exists")
        pod = Pod(name, namespace, node.name, f"{self.prefix}p-{namespace}-{name}",
                  secrets.token_hex(32), labels=labels or {}, ports=ports or [])
        self._netns_add(pod.netns)
        try:
            res = self.run_plugin("ADD", pod, node)
        except Exception:
            self._netns_del(pod.netns)
            raise
        pod.ip = res["ips"][0]["address"].split("/")[0]
        pod.mac = res["interfaces"][res["ips"][0].get("interface", 0)]["mac"]
        with self._locked() as st:
            st["pods"].append(asdict(pod))
        self.datastore.pod_put(pod)
        return pod

    def pod_del(self, ref: str) -> Pod:
        pod = self.pod(ref)
        self.run_plugin("DEL", pod, self.node(pod.node))
        self._netns_del(pod.netns)
        self.datastore.pod_deleted(pod)
        with self._locked() as st:
            st["pods"] = [p for p in st["pods"]
                          if not (p["name"] == pod.name and p["namespace"] == pod.namespace)]
        return pod

    def set_labels(self, ref: str, labels: dict[str, str]) -> Pod:
        """Relabel a pod (as `kubectl label` would); policies follow."""
        pod = self.pod(ref)
        pod.labels = dict(labels)
        with self._locked() as st:
            st["pods"] = [asdict(pod) if (p["name"], p["namespace"]) == (pod.name, pod.namespace)
                          else p for p in st["pods"]]
        self.datastore.pod_put(pod)
        return pod

    def wait_realized(self, timeout: float = 10.0) -> int:
        """Wait until every agent has applied the datastore's current revision."""
        rev = self.store().revision()
        deadline = time.monotonic() + timeout
        for n in self.nodes():
            while True:
                st = AgentClient(n.api_socket).status()
                if st.get("applied_revision", 0) >= rev:
                    break
                if time.monotonic() > deadline:
                    raise LabError(f"{n.name} applied revision {st.get('applied_revision')} "
                                   f"< {rev} after {timeout}s")
                time.sleep(0.01)
        return rev

    def exec_argv(self, ref: str, argv: list[str]) -> list[str]:
        return netns.exec_argv(self.pod(ref).netns, argv)
