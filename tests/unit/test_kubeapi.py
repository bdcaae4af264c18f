"""The agent's own Kubernetes client (datastore.kubeapi): where credentials come from.

In-cluster and kubeconfig settings against the fake API server serving TLS with a
throw-away certificate (openssl); what the client cannot do is refused naming the field.
"""

from __future__ import annotations

import base64
import json
import shutil
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from flowcni.datastore.kubeapi import (
    ApiError,
    Client,
    ConfigError,
    Credentials,
    from_kubeconfig,
    in_cluster,
)

from tests.support.fakeapi import FakeAPIServer, node_obj

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=kubernetes", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(d / "api.key"), "-out", str(d / "ca.crt")],
                   check=True, capture_output=True)
    return d


@pytest.fixture
def tls_server(pki: Path) -> Iterator[FakeAPIServer]:
    srv = FakeAPIServer()
    srv.use_tls(str(pki / "ca.crt"), str(pki / "api.key"))
    srv.start()
    srv.put("nodes", node_obj("n1", "192.168.77.1", "10.244.1.0/24"))
    yield srv
    srv.stop()


def _names(client: Client) -> list[str]:
    resp = client.get("/api/v1/nodes", {"limit": 10}, 5, 5)
    try:
        return [i["metadata"]["name"] for i in json.loads(resp.read())["items"]]
    finally:
        resp.close()


def _kubeconfig(path: Path, cluster: dict[str, Any], user: dict[str, Any]) -> str:
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "clusters": [{"name": "k", "cluster": cluster}], "users": [{"name": "u", "user": user}],
        "contexts": [{"name": "c", "context": {"cluster": "k", "user": "u"}},
                     {"name": "other", "context": {"cluster": "missing", "user": "u"}}]}))
    return str(path)


def test_in_cluster_service_account(tls_server: FakeAPIServer, pki: Path, tmp_path: Path,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The service account's CA verifies the server; its token is re-read per request."""
    sa = tmp_path / "sa"
    sa.mkdir()
    shutil.copy(pki / "ca.crt", sa / "ca.crt")
    (sa / "token").write_text("t1")
    port = tls_server.url.rsplit(":", 1)[1]
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "127.0.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", port)
    client = Client(in_cluster(str(sa)))
    assert _names(client) == ["n1"]
    (sa / "token").write_text("t2")  # the kubelet rotated it
    assert _names(client) == ["n1"]
    assert [r["auth"] for r in tls_server.requests("/api/v1/nodes")] == ["Bearer t1", "Bearer t2"]
    (sa / "token").unlink()
    with pytest.raises(ConfigError, match="service account token .*token"):
        _names(client)
    with pytest.raises(ConfigError, match=r"token: no such file"):
        in_cluster(str(sa))
    monkeypatch.delenv("KUBERNETES_SERVICE_PORT")
    with pytest.raises(ConfigError, match="KUBERNETES_SERVICE_HOST and KUBERNETES_SERVICE_PORT"):
        in_cluster(str(sa))


def test_kubeconfig_tls_settings(tls_server: FakeAPIServer, pki: Path, tmp_path: Path,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """certificate-authority (relative to the file), -data, insecure-skip-tls-verify, a
    client certificate inline; without a CA the server's certificate is refused."""
    import tempfile
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    ca_data = base64.b64encode((pki / "ca.crt").read_bytes()).decode()
    shutil.copy(pki / "ca.crt", tmp_path / "ca.crt")
    url = tls_server.url
    for cluster in ({"server": url, "certificate-authority": "ca.crt"},
                    {"server": url, "certificate-authority-data": ca_data},
                    {"server": url, "insecure-skip-tls-verify": True}):
        kc = _kubeconfig(tmp_path / "kc", cluster, {"token": "abc"})
        assert _names(Client(from_kubeconfig(kc))) == ["n1"], cluster
    assert tls_server.requests()[-1]["auth"] == "Bearer abc"
    cert = {"client-certificate-data": ca_data,
            "client-key-data": base64.b64encode((pki / "api.key").read_bytes()).decode()}
    kc = _kubeconfig(tmp_path / "kc", {"server": url, "certificate-authority-data": ca_data},
                     cert)
    assert _names(Client(from_kubeconfig(kc))) == ["n1"]
    assert not list(tmp_path.glob("flowcni-kube-*")), "the inline key file is removed"
    kc = _kubeconfig(tmp_path / "kc", {"server": url}, {})
    with pytest.raises(ssl.SSLCertVerificationError):
        _names(Client(from_kubeconfig(kc)))


def test_kubeconfig_errors_name_the_field(tmp_path: Path) -> None:
    def err(cluster: dict[str, Any], user: dict[str, Any], match: str,
            context: str | None = None) -> None:
        kc = _kubeconfig(tmp_path / "kc", cluster, user)
        with pytest.raises(ConfigError, match=match):
            from_kubeconfig(kc, context)

    ok = {"server": "https://127.0.0.1:6443"}
    err(ok, {"exec": {"command": "aws"}}, "user exec plugins are not supported")
    err(ok, {"auth-provider": {"name": "gcp"}}, "user auth-provider plugins")
    err({}, {}, "cluster has no server")
    err({"server": "ftp://x"}, {}, "is not an http")
    err({**ok, "certificate-authority-data": "###"}, {}, "certificate-authority-data is not "
        "base64")
    err(ok, {"client-certificate": "c.pem"}, "client-certificate without client-key")
    err({**ok, "certificate-authority": "nope.crt"}, {}, "TLS settings: .*No such file")
    err(ok, {}, "no entry 'missing' in clusters", context="other")
    err(ok, {}, "no entry 'ghost' in contexts", context="ghost")


def test_json_kubeconfig_read_without_pyyaml(tmp_path: Path) -> None:
    """JSON is YAML too: the lab's JSON kubeconfig costs no PyYAML import; YAML
    still reads, and a file that is neither is a clear error."""
    kc = tmp_path / "kc.json"
    kc.write_text(json.dumps({
        "current-context": "c", "clusters": [{"name": "k", "cluster": {"server":
                                                                       "http://127.0.0.1:1"}}],
        "users": [{"name": "u", "user": {"token": "t"}}],
        "contexts": [{"name": "c", "context": {"cluster": "k", "user": "u"}}]}))
    code = ("import sys; from flowcni.datastore.kubeapi import from_kubeconfig; "
            f"c = from_kubeconfig({str(kc)!r}); "
            "print(c.server, 'yaml' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["http://127.0.0.1:1", "False"]
    yml = _kubeconfig(tmp_path / "kc.yaml", {"server": "http://127.0.0.1:2"}, {})
    assert from_kubeconfig(yml).server == "http://127.0.0.1:2"
    (tmp_path / "bad").write_text("clusters: [\n")
    with pytest.raises(ConfigError, match="kubeconfig .*bad"):
        from_kubeconfig(str(tmp_path / "bad"))


def test_error_statuses_carry_the_servers_message(tmp_path: Path) -> None:
    with FakeAPIServer() as srv:
        kc = _kubeconfig(tmp_path / "kc", {"server": srv.url}, {})
        client = Client(from_kubeconfig(kc))
        with pytest.raises(ApiError) as e:
            client.get("/api/v1/nothings", {}, 5, 5)
        assert e.value.status == 404 and "could not find the requested resource" in str(e.value)


def test_default_ports_quoted_booleans_and_no_token_in_repr(tmp_path: Path) -> None:
    """A server without a port gets the scheme's (a bare IPv6 host is not split at its
    last colon); only YAML's true skips verification, not the string "false"; the token
    never shows in a repr (which can end up in a log line)."""
    c = Client(Credentials("https://[fd00::1]", token="s3cret"))
    assert (c.host, c.port) == ("fd00::1", 443)
    assert Client(Credentials("http://10.0.0.1")).port == 80
    assert "s3cret" not in repr(c.creds)
    creds = from_kubeconfig(_kubeconfig(
        tmp_path / "kc", {"server": "https://127.0.0.1:6443", "insecure-skip-tls-verify": "false"},
        {"token": "t"}))
    assert creds.ssl_context is not None
    assert creds.ssl_context.verify_mode == ssl.CERT_REQUIRED and creds.ssl_context.check_hostname
