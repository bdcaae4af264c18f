"""A lab whose agents take their cluster from a (fake) Kubernetes API server.

The fake API server runs in the lab's `external` namespace on the underlay,
where every node's agent reaches it over HTTP; the test drives it through
its unix control socket. Nodes are seeded as a kubelet and the controller
manager would leave them (InternalIP, spec.podCIDR), and pods are reported
with their IPs after the CNI ADD, as a kubelet does. Each node's agent also
appears as a pod of the flowcni DaemonSet (flowcni-system, app=flowcni-agent)
whose exec runs commands in the node's namespace with `flowctl` on PATH and
the agent's API socket in FLOWCNI_AGENT_SOCKET, as its container would: so
`flowctl --kubeconfig` reaches the agents through the API server.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from flowcni.lab import netns
from flowcni.lab.lab import EXTERNAL_UNDERLAY_IP, Lab, LabDatastore, Node, Pod

from tests.support.fakeapi import Control, namespace_obj, node_obj, pod_obj, write_kubeconfig

REPO = str(Path(__file__).resolve().parents[2])
API_PORT = 6443
AGENT_NS = "flowcni-system"


class KubeLabDatastore(LabDatastore):
    def __init__(self, lab: Lab) -> None:
        super().__init__(lab)
        self.proc: subprocess.Popen[str] | None = None
        self.ctl: Control | None = None

    @property
    def kubeconfig(self) -> str:
        return os.path.join(self.lab.base, "kubeconfig")

    def control(self) -> Control:
        """Start the API server on first use (the underlay exists by then)."""
        if self.ctl is None:
            sock = os.path.join(self.lab.base, "fakeapi.sock")
            self.proc = subprocess.Popen(
                netns.exec_argv(self.lab.external_ns, [
                    sys.executable, "-m", "tests.support.fakeapi",
                    "--listen", f"{EXTERNAL_UNDERLAY_IP}:{API_PORT}", "--control", sock]),
                stdout=subprocess.PIPE, text=True, cwd=REPO,
                env={**os.environ, "PYTHONPATH": REPO})
            assert self.proc.stdout is not None
            self.proc.stdout.readline()  # ready line
            write_kubeconfig(self.kubeconfig, f"http://{EXTERNAL_UNDERLAY_IP}:{API_PORT}")
            self.ctl = Control(sock)
            for ns in ("default", "kube-system", AGENT_NS):
                self.ctl.put("namespaces", namespace_obj(ns))
        return self.ctl

    def flowctl_bin(self) -> str:
        """A directory with `flowctl` in it: the agent image's command, for pod exec."""
        d = os.path.join(self.lab.base, "image-bin")
        os.makedirs(d, exist_ok=True)
        path = os.path.join(d, "flowctl")
        with open(path, "w") as f:
            f.write(f'#!/bin/sh\nexec {sys.executable} -m flowcni.ctl.flowctl "$@"\n')
        os.chmod(path, 0o755)
        return d

    @staticmethod
    def agent_pod(node: Node) -> str:
        return f"flowcni-agent-{node.name}"

    def agent_args(self, node: Node) -> list[str]:
        ctl = self.control()
        ctl.put("nodes", node_obj(node.name, node.node_ip, self.pod_cidr(node)))
        pod = pod_obj(AGENT_NS, self.agent_pod(node), node.name, None,
                      {"app": "flowcni-agent"}, container="agent")
        pod["spec"]["hostNetwork"] = True
        ctl.put("pods", pod)
        ctl.set_exec(AGENT_NS, self.agent_pod(node), [
            "ip", "netns", "exec", node.netns, "env",
            f"PATH={self.flowctl_bin()}:{os.environ.get('PATH', '/usr/bin:/bin')}",
            f"FLOWCNI_AGENT_SOCKET={node.api_socket}", f"PYTHONPATH={REPO}"])
        return ["--datastore", "kubernetes", "--kubeconfig", self.kubeconfig,
                "--node-ip", node.node_ip]

    @staticmethod
    def pod_cidr(node: Node) -> str:
        return f"10.244.{node.index}.0/24"

    def node_added(self, node: Node) -> str:
        return self.pod_cidr(node)

    def node_removed(self, node: Node) -> None:
        self.control().delete("nodes", node.name)
        self.control().delete("pods", self.agent_pod(node), AGENT_NS)

    def pod_put(self, pod: Pod) -> None:
        self.control().put("pods", pod_obj(pod.namespace, pod.name, pod.node, pod.ip,
                                           pod.labels, pod.ports))

    def pod_deleted(self, pod: Pod) -> None:
        self.control().delete("pods", pod.name, pod.namespace)

    def stop(self) -> None:
        if self.ctl is not None:
            try:
                self.ctl.shutdown()
            except OSError:
                pass
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
