"""Node providers: where flowctl finds agents, and how it talks to each.

Three ways, one interface (`agents()`, each a node name and a client):
- local: the agent API socket of this node (`--agent-socket`, FLOWCNI_AGENT_SOCKET,
  or the default path);
- cluster: the agent pods of the flowcni DaemonSet, found through the Kubernetes
  API server, each reached by a pod exec of `flowctl call` next to its agent (no SSH);
- lab: provided by the lab package itself through the `flowcni.node_providers`
  entry point, so the CLI never imports the lab.
`--node NAME` selects among a provider's agents the same way in all three.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any, Protocol

from flowcni.api import schema as api
from flowcni.api.schema import Request
from flowcni.ctl.client import UNREACHABLE, AgentClient, AgentError, Caller, decode

PROVIDER_GROUP = "flowcni.node_providers"
COMMAND_GROUP = "flowcni.flowctl_commands"
AGENT_NAMESPACE = "flowcni-system"
AGENT_SELECTOR = "app=flowcni-agent"
AGENT_CONTAINER = "agent"


class ProviderError(RuntimeError):
    """No agent to talk to, or no node of the name asked for."""


@dataclass
class NodeAgent:
    name: str
    client: Caller

    def call(self, verb: str, **args: Any) -> dict[str, Any]:
        return self.client.call(verb, **args)


class Provider(Protocol):
    kind: str

    def agents(self) -> list[NodeAgent]: ...

    def describe(self) -> str: ...


def select(p: Provider, node: str | None) -> list[NodeAgent]:
    """The agents `--node` asks for (all without it); an unknown name is an error."""
    agents = p.agents()
    if not agents:
        raise ProviderError(f"no flowcni agent found ({p.describe()})")
    if node is None:
        return agents
    chosen = [a for a in agents if a.name == node]
    if not chosen:
        raise ProviderError(f"no node {node!r} ({p.describe()}; nodes: "
                            f"{', '.join(a.name for a in agents)})")
    return chosen


class LocalProvider:
    """The one agent whose API socket is on this machine."""

    kind = "local"

    def __init__(self, path: str) -> None:
        self.path = path
        self._agents: list[NodeAgent] | None = None

    def describe(self) -> str:
        return f"local agent at {self.path}"

    def agents(self) -> list[NodeAgent]:
        if self._agents is None:
            client = AgentClient(self.path)
            self._agents = [NodeAgent(str(client.status()["node"]), client)]
        return self._agents


class ExecClient:
    """An agent API call made by `flowctl call` inside the agent's pod, via pod exec."""

    def __init__(self, core: Any, namespace: str, pod: str, container: str,
                 socket: str | None = None, timeout: float = 60.0) -> None:
        self.core, self.namespace, self.pod = core, namespace, pod
        self.container, self.socket, self.timeout = container, socket, timeout

    def call(self, verb: str, **args: Any) -> dict[str, Any]:
        from kubernetes.stream import stream
        req = Request(verb, args)
        # Without --agent-socket, `flowctl call` finds the socket as the agent's container
        # says ($FLOWCNI_AGENT_SOCKET, else the default path the DaemonSet uses).
        cmd = ["flowctl", "call", *(["--agent-socket", self.socket] if self.socket else []),
               verb, json.dumps(req.args)]
        where = f"agent pod {self.namespace}/{self.pod}"
        try:
            ws = stream(self.core.connect_get_namespaced_pod_exec, self.pod, self.namespace,
                        container=self.container, command=cmd, stdout=True, stderr=True,
                        stdin=False, tty=False, _preload_content=False)
            ws.run_forever(timeout=self.timeout)
            out, err = ws.read_stdout(), ws.read_stderr()
            ws.close()
        except Exception as e:  # the client raises ApiException, WebSocket errors, OSError
            raise AgentError(f"{verb}: exec in {where}: {e}", UNREACHABLE) from e
        if not out.strip():
            raise AgentError(f"{verb}: no reply from {where}: {err.strip() or 'no output'}",
                             UNREACHABLE)
        return decode(verb, out.encode())


class ClusterProvider:
    """The agent pods of the flowcni DaemonSet, through the API server."""

    kind = "cluster"

    def __init__(self, kubeconfig: str | None, context: str | None,
                 namespace: str = AGENT_NAMESPACE, selector: str = AGENT_SELECTOR,
                 container: str = AGENT_CONTAINER, socket: str | None = None) -> None:
        self.kubeconfig, self.context = kubeconfig, context
        self.namespace, self.selector, self.container = namespace, selector, container
        self.socket = socket
        self._agents: list[NodeAgent] | None = None

    def describe(self) -> str:
        return (f"cluster of {self.kubeconfig or 'the default kubeconfig'}"
                f"{', context ' + self.context if self.context else ''}: pods {self.selector} "
                f"in {self.namespace}")

    def agents(self) -> list[NodeAgent]:
        if self._agents is None:
            from kubernetes import client, config
            try:
                api_client = config.new_client_from_config(config_file=self.kubeconfig,
                                                           context=self.context)
                core = client.CoreV1Api(api_client)
                pods: list[Any] = core.list_namespaced_pod(
                    self.namespace, label_selector=self.selector, _request_timeout=30).items
            except Exception as e:
                raise ProviderError(f"{self.describe()}: {e}") from e
            self._agents = sorted(
                (NodeAgent(p.spec.node_name, ExecClient(core, self.namespace, p.metadata.name,
                                                        self.container, self.socket))
                 for p in pods if p.spec.node_name and p.status.phase == "Running"),
                key=lambda a: a.name)
        return self._agents


def plugins(group: str) -> dict[str, Callable[..., Any]]:
    """Entry points of `group` (name -> loaded object): how the lab plugs in."""
    return {ep.name: ep.load() for ep in entry_points(group=group)}


def from_args(a: Any) -> Provider:
    """The provider the global options ask for; without any: the lab if one is up
    (saying so on stderr), else the local socket."""
    if getattr(a, "kubeconfig", None) or getattr(a, "context", None):
        return ClusterProvider(a.kubeconfig, a.context, a.agent_namespace, a.agent_selector)
    sock = getattr(a, "agent_socket", None) or os.environ.get(api.SOCKET_ENV)
    if sock:
        return LocalProvider(sock)
    labs = plugins(PROVIDER_GROUP).get("lab")
    if getattr(a, "lab", False):
        if labs is None:
            raise ProviderError("--lab: the lab package is not installed")
        p: Provider = labs(required=True)
        return p
    if labs is not None:
        found = labs(required=False)
        if found is not None:
            return found  # type: ignore[no-any-return]
    if not os.path.exists(api.DEFAULT_SOCKET):
        raise ProviderError(f"no agent: no API socket at {api.DEFAULT_SOCKET} and no lab up; "
                            "use --agent-socket PATH, --kubeconfig/--context or --lab")
    return LocalProvider(api.DEFAULT_SOCKET)
