"""A lab whose agents take their cluster from a (fake) Kubernetes API server.

The fake API server runs in the lab's `external` namespace on the underlay,
where every node's agent reaches it over HTTP; the test drives it through
its unix control socket. Nodes are seeded as a kubelet and the controller
manager would leave them (InternalIP, spec.podCIDR), and pods are reported
with their IPs after the CNI ADD, as a kubelet does.
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
            for ns in ("default", "kube-system"):
                self.ctl.put("namespaces", namespace_obj(ns))
        return self.ctl

    def agent_args(self, node: Node) -> list[str]:
        self.control().put("nodes", node_obj(node.name, node.node_ip, self.pod_cidr(node)))
        return ["--datastore", "kubernetes", "--kubeconfig", self.kubeconfig,
                "--node-ip", node.node_ip]

    @staticmethod
    def pod_cidr(node: Node) -> str:
        return f"10.244.{node.index}.0/24"

    def node_added(self, node: Node) -> str:
        return self.pod_cidr(node)

    def node_removed(self, node: Node) -> None:
        self.control().delete("nodes", node.name)

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
