"""A small read-only Kubernetes API client on the standard library (http.client, ssl).

The agent only ever GETs collections (list in pages, watch as a stream of
newline-delimited JSON), so it needs a connection, credentials and error
statuses, not the `kubernetes` package: importing that package loads every
API model module and its dependencies (about 60 MB of the agent's RSS, more
than the informer cache holds for 10,000 pods; see the y15b note). ctl's
cluster provider still uses the package for pod exec over WebSocket; the
agent must not import it (tests/unit/test_layout.py checks).

Where the credentials come from:
- a kubeconfig file (the lab, tests, `flowcni-agent --kubeconfig`): the
  current context's cluster (`server`, `certificate-authority(-data)`,
  `insecure-skip-tls-verify`) and user (`token`,
  `tokenFile`, `client-certificate(-data)`, `client-key(-data)`); relative
  paths are relative to the file, as kubectl reads them. Exec and
  auth-provider plugins are refused by name (the agent runs in-cluster).
- in-cluster (the DaemonSet): KUBERNETES_SERVICE_HOST/PORT, the service
  account's CA, and its token, re-read before every request because the
  kubelet rotates the projected token file in place.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import socket
import ssl
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode, urlsplit

SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"


class ConfigError(Exception):
    """The client cannot be configured; the message names the file or setting."""


class ApiError(Exception):
    """A non-2xx answer; `status`, `reason` and the server's `message` (from its Status)."""

    def __init__(self, status: int, reason: str, message: str, path: str) -> None:
        self.status, self.reason, self.message, self.path = status, reason, message, path
        super().__init__(f"HTTP {status} {reason}: {message}" if message
                         else f"HTTP {status} {reason}")


class ReadTimeout(OSError):
    """No byte arrived within the read timeout (a watch whose peer went silent)."""


@dataclass
class Credentials:
    """Where to connect and how to authenticate; `token_file` is read per request."""

    server: str
    ssl_context: ssl.SSLContext | None = None  # None: plain HTTP (the fake API server)
    token: str | None = field(default=None, repr=False)  # never in a log line
    token_file: str | None = None

    def authorization(self) -> str | None:
        if self.token_file:
            try:
                with open(self.token_file) as f:
                    token = f.read().strip()
            except OSError as e:
                raise ConfigError(f"service account token {self.token_file}: {e}") from e
            return f"Bearer {token}" if token else None
        return f"Bearer {self.token}" if self.token else None


def _tls(ca_file: str | None, ca_data: bytes | None, insecure: bool,
         cert: tuple[str | bytes, str | bytes] | None) -> ssl.SSLContext:
    """A client TLS context: the cluster's CA (else the system's), a client certificate."""
    ctx = ssl.create_default_context(cafile=ca_file,
                                     cadata=ca_data.decode() if ca_data else None)
    if insecure:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if cert is not None:
        _load_cert_chain(ctx, *cert)
    return ctx


def _load_cert_chain(ctx: ssl.SSLContext, cert: str | bytes, key: str | bytes) -> None:
    """ssl only loads certificates from files: inline (-data) ones go through a private
    temporary directory that is removed at once."""
    if isinstance(cert, str) and isinstance(key, str):
        ctx.load_cert_chain(cert, key)
        return
    with tempfile.TemporaryDirectory(prefix="flowcni-kube-") as d:
        paths = []
        for name, value in (("cert.pem", cert), ("key.pem", key)):
            if isinstance(value, str):
                paths.append(value)
                continue
            path = os.path.join(d, name)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(value)
            paths.append(path)
        ctx.load_cert_chain(paths[0], paths[1])


def in_cluster(sa_dir: str = SA_DIR) -> Credentials:
    """The pod's service account, as the kubelet mounts it."""
    host, port = os.environ.get("KUBERNETES_SERVICE_HOST"), os.environ.get(
        "KUBERNETES_SERVICE_PORT")
    if not host or not port:
        raise ConfigError("KUBERNETES_SERVICE_HOST and KUBERNETES_SERVICE_PORT are not set "
                          "(not running in a pod?)")
    token, ca = os.path.join(sa_dir, "token"), os.path.join(sa_dir, "ca.crt")
    for path in (token, ca):
        if not os.path.isfile(path):
            raise ConfigError(f"{path}: no such file (is the service account token mounted?)")
    if ":" in host:
        host = f"[{host}]"
    try:
        ctx = _tls(ca, None, False, None)
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(f"{ca}: {e}") from e
    return Credentials(f"https://{host}:{port}", ctx, token_file=token)


def _named(doc: dict[str, Any], section: str, name: str, where: str) -> dict[str, Any]:
    for entry in doc.get(section) or []:
        if isinstance(entry, dict) and entry.get("name") == name:
            body = entry.get(section[:-1])  # clusters -> cluster, users -> user
            if body is None:
                return {}
            if not isinstance(body, dict):
                raise ConfigError(f"{where}: {section} {name!r} is not a mapping")
            return body
    raise ConfigError(f"{where}: no entry {name!r} in {section}")


def _data(where: str, field: str, value: Any) -> bytes:
    try:
        return base64.b64decode(str(value), validate=True)
    except ValueError as e:
        raise ConfigError(f"{where}: {field} is not base64: {e}") from e


def from_kubeconfig(path: str, context: str | None = None) -> Credentials:
    """The current (or named) context of a kubeconfig file."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError as e:
        raise ConfigError(f"kubeconfig {path}: {e}") from e
    try:
        # JSON is YAML too: a kubeconfig written as JSON (the lab's) is read without
        # PyYAML, whose import is 1 MB of the agent's RSS (an in-cluster agent has
        # no kubeconfig at all)
        doc = json.loads(text)
    except ValueError:
        import yaml

        try:
            doc = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"kubeconfig {path}: {e}") from e
    if not isinstance(doc, dict):
        raise ConfigError(f"kubeconfig {path}: not a mapping")
    name = context or doc.get("current-context")
    if not name:
        raise ConfigError(f"kubeconfig {path}: no current-context")
    ctx = _named(doc, "contexts", str(name), path)
    where = f"kubeconfig {path}, context {name}"
    cluster = _named(doc, "clusters", str(ctx.get("cluster")), where)
    user = _named(doc, "users", str(ctx.get("user")), where) if ctx.get("user") else {}
    base = os.path.dirname(os.path.abspath(path))

    def file(value: Any) -> str:
        return os.path.join(base, str(value))

    server = cluster.get("server")
    if not isinstance(server, str) or not server:
        raise ConfigError(f"{where}: cluster has no server")
    scheme = urlsplit(server).scheme
    if scheme not in ("http", "https"):
        raise ConfigError(f"{where}: server {server!r} is not an http(s) URL")
    for unsupported in ("exec", "auth-provider"):
        if user.get(unsupported):
            raise ConfigError(f"{where}: user {unsupported} plugins are not supported; use a "
                              "token or a client certificate")
    cert: tuple[str | bytes, str | bytes] | None = None
    if user.get("client-certificate") or user.get("client-certificate-data"):
        c: str | bytes = (_data(where, "client-certificate-data", user["client-certificate-data"])
                          if user.get("client-certificate-data")
                          else file(user["client-certificate"]))
        if not (user.get("client-key") or user.get("client-key-data")):
            raise ConfigError(f"{where}: client-certificate without client-key")
        k: str | bytes = (_data(where, "client-key-data", user["client-key-data"])
                          if user.get("client-key-data") else file(user["client-key"]))
        cert = (c, k)
    tls = None
    if scheme == "https":
        ca_data = (_data(where, "certificate-authority-data",
                         cluster["certificate-authority-data"])
                   if cluster.get("certificate-authority-data") else None)
        ca_file = (file(cluster["certificate-authority"])
                   if cluster.get("certificate-authority") and ca_data is None else None)
        try:
            # only YAML's true turns verification off (a quoted "false" is a string)
            tls = _tls(ca_file, ca_data, cluster.get("insecure-skip-tls-verify") is True, cert)
        except (OSError, ssl.SSLError, ValueError) as e:
            raise ConfigError(f"{where}: TLS settings: {e}") from e
    token = user.get("token")
    token_file = file(user["tokenFile"]) if user.get("tokenFile") and not token else None
    return Credentials(server.rstrip("/"), tls, token=str(token) if token else None,
                       token_file=token_file)


class Response:
    """An open response: `read()` for a list page, `lines()` for a watch; always close()."""

    def __init__(self, conn: http.client.HTTPConnection, resp: http.client.HTTPResponse,
                 sock: socket.socket | None) -> None:
        self._conn, self._resp, self._sock = conn, resp, sock

    def read(self) -> bytes:
        """The whole body (a list page)."""
        try:
            return self._resp.read()
        except TimeoutError as e:
            raise ReadTimeout(f"read timed out: {e}") from e

    def lines(self) -> Iterator[bytes]:
        """Each non-empty line as it arrives (http.client undoes the chunking)."""
        while True:
            try:
                line = self._resp.readline()
            except TimeoutError as e:
                raise ReadTimeout(f"read timed out: {e}") from e
            if not line:
                return
            if line.strip():
                yield line

    def abort(self) -> None:
        """Cut the connection from another thread: a blocked read returns at once."""
        if self._sock is not None:
            try:
                self._sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        self._resp.close()
        self._conn.close()


class Client:
    """GET requests against one API server, one connection each (lists are paged, watches
    are long-lived: neither gains from pooling)."""

    def __init__(self, creds: Credentials) -> None:
        self.creds = creds
        u = urlsplit(creds.server)
        # the port always given: http.client would split a bare IPv6 host at its last colon
        self.scheme, self.host = u.scheme, u.hostname or ""
        self.port = u.port or (443 if u.scheme == "https" else 80)
        self.base_path = u.path.rstrip("/")

    def get(self, path: str, query: dict[str, Any], connect_timeout: float,
            read_timeout: float) -> Response:
        """Send the request; an ApiError for a non-2xx status (its Status message read)."""
        q = {k: ("true" if v is True else v) for k, v in query.items() if v is not None}
        target = f"{self.base_path}{path}" + (f"?{urlencode(q)}" if q else "")
        conn: http.client.HTTPConnection
        if self.scheme == "https":
            conn = http.client.HTTPSConnection(self.host, self.port, timeout=connect_timeout,
                                               context=self.creds.ssl_context)
        else:
            conn = http.client.HTTPConnection(self.host, self.port, timeout=connect_timeout)
        try:
            conn.connect()
            sock = conn.sock
            sock.settimeout(read_timeout)
            headers = {"Accept": "application/json", "User-Agent": "flowcni-agent"}
            auth = self.creds.authorization()
            if auth:
                headers["Authorization"] = auth
            conn.request("GET", target, headers=headers)
            resp = conn.getresponse()
        except TimeoutError as e:
            conn.close()
            raise ReadTimeout(f"{path}: timed out: {e}") from e
        except BaseException:
            conn.close()
            raise
        if not 200 <= resp.status < 300:
            try:
                body = resp.read(1 << 16)
            except (OSError, http.client.HTTPException):
                body = b""
            finally:
                conn.close()
            raise _error(resp.status, resp.reason, body, path)
        return Response(conn, resp, sock)

    def close(self) -> None:
        """Nothing is pooled; kept so the datastore can close whatever client it has."""


def _error(status: int, reason: str, body: bytes, path: str) -> ApiError:
    message = ""
    try:
        st = json.loads(body)
        if isinstance(st, dict):
            message = str(st.get("message") or "")
            reason = str(st.get("reason") or reason)
    except ValueError:
        message = body.decode(errors="replace").strip()[:200]
    return ApiError(status, reason, message, path)
