"""Build a tiny, deterministic busybox OCI image archive (``oci-archive`` tar).

The image is made from ``/bin/busybox`` of Debian's ``busybox-static`` package, so
tests can start real containers without pulling anything from a registry.

Layout of the produced tar (OCI image layout spec)::

    oci-layout                      {"imageLayoutVersion": "1.0.0"}
    index.json                      one manifest, annotated with the image name
    blobs/sha256/<config>           image config (rootfs.diff_ids = [sha256(layer.tar)])
    blobs/sha256/<manifest>         image manifest
    blobs/sha256/<layer>            gzip'd rootfs tar

The rootfs holds ``/bin/busybox`` plus one symlink per applet (``busybox --list``) in
``/bin``, ``/etc/passwd``, ``/etc/group``, an empty ``/etc/resolv.conf`` and ``/tmp``.

Everything is built in memory with fixed mtimes, owners and gzip headers, so the same
busybox binary always gives the same digests.  Results are cached by content in
``/var/cache/flowcni-test`` (override with ``FLOWCNI_TEST_CACHE``).

Both ``podman load -i ARCHIVE`` and ``ctr images import ARCHIVE`` accept the archive;
the index carries the full name both as ``org.opencontainers.image.ref.name`` and as
containerd's ``io.containerd.image.name``.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import platform
import shutil
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass

BUSYBOX = "/bin/busybox"
DEFAULT_NAME = "localhost/flowcni-busybox:latest"
DEFAULT_CACHE_DIR = "/var/cache/flowcni-test"
# Bump when the image layout produced below changes: it is part of the cache key.
FORMAT_VERSION = "1"
# 2000-01-01T00:00:00Z: fixed mtime for every tar entry.
FIXED_MTIME = 946684800
CREATED = "2000-01-01T00:00:00Z"

MT_INDEX = "application/vnd.oci.image.index.v1+json"
MT_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_CONFIG = "application/vnd.oci.image.config.v1+json"
MT_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
ANN_REF_NAME = "org.opencontainers.image.ref.name"
ANN_CONTAINERD_NAME = "io.containerd.image.name"

PASSWD = (
    "root:x:0:0:root:/root:/bin/sh\n"
    "daemon:x:1:1:daemon:/usr/sbin:/bin/false\n"
    "nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
)
GROUP = "root:x:0:\ndaemon:x:1:\nnogroup:x:65534:\n"

_GOARCH = {
    "x86_64": "amd64",
    "amd64": "amd64",
    "aarch64": "arm64",
    "arm64": "arm64",
    "armv7l": "arm",
    "ppc64le": "ppc64le",
    "s390x": "s390x",
    "riscv64": "riscv64",
    "i686": "386",
    "i386": "386",
}


@dataclass(frozen=True)
class OciImage:
    """What :func:`build_busybox_oci_image` produced."""

    path: str  # the oci-archive tar
    name: str  # image reference stored in index.json
    manifest_digest: str  # "sha256:..." (the image id for containerd)
    config_digest: str  # "sha256:..." (the image id for podman)
    layer_digest: str  # "sha256:..." of the gzip'd layer
    archive_sha256: str  # hex sha256 of the whole tar file
    from_cache: bool


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def busybox_applets(busybox: str = BUSYBOX) -> list[str]:
    """Applet names of ``busybox --list`` (sorted, without ``busybox`` itself)."""
    out = subprocess.run([busybox, "--list"], check=True, capture_output=True, text=True).stdout
    names = {n.strip() for n in out.splitlines()}
    return sorted(n for n in names if n and "/" not in n and n != "busybox")


def _tarinfo(
    name: str, kind: bytes, mode: int, size: int = 0, linkname: str = ""
) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type = kind
    ti.mode = mode
    ti.size = size
    ti.linkname = linkname
    ti.mtime = FIXED_MTIME
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = "root"
    return ti


class _TarWriter:
    """Deterministic tar writer (explicit entry order, fixed metadata)."""

    def __init__(self) -> None:
        self.buf = io.BytesIO()
        self.tar = tarfile.open(fileobj=self.buf, mode="w", format=tarfile.PAX_FORMAT)

    def dir(self, name: str, mode: int = 0o755) -> None:
        self.tar.addfile(_tarinfo(name, tarfile.DIRTYPE, mode))

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self.tar.addfile(_tarinfo(name, tarfile.REGTYPE, mode, len(data)), io.BytesIO(data))

    def symlink(self, name: str, target: str) -> None:
        self.tar.addfile(_tarinfo(name, tarfile.SYMTYPE, 0o777, linkname=target))

    def close(self) -> bytes:
        self.tar.close()
        return self.buf.getvalue()


def _rootfs_tar(busybox_bytes: bytes, applets: list[str]) -> bytes:
    w = _TarWriter()
    for d in ("bin", "dev", "etc", "proc", "root", "run", "sys", "usr", "var"):
        w.dir(d, 0o700 if d == "root" else 0o755)
    w.file("bin/busybox", busybox_bytes, 0o755)
    for applet in applets:
        w.symlink(f"bin/{applet}", "busybox")
    w.file("etc/passwd", PASSWD.encode())
    w.file("etc/group", GROUP.encode())
    w.file("etc/resolv.conf", b"")
    w.file("etc/hostname", b"")
    w.file("etc/hosts", b"127.0.0.1\tlocalhost\n::1\tlocalhost\n")
    w.dir("tmp", 0o1777)
    w.dir("var/tmp", 0o1777)
    return w.close()


def _gzip(data: bytes) -> bytes:
    out = io.BytesIO()
    # mtime=0 and an empty filename keep the gzip header fixed.
    with gzip.GzipFile(filename="", mode="wb", fileobj=out, compresslevel=6, mtime=0) as gz:
        gz.write(data)
    return out.getvalue()


def _canonical_json(obj: object) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def _build_archive(
    busybox_bytes: bytes, applets: list[str], name: str
) -> tuple[bytes, dict[str, str]]:
    layer_tar = _rootfs_tar(busybox_bytes, applets)
    layer_gz = _gzip(layer_tar)
    arch = _GOARCH.get(platform.machine(), platform.machine())
    config = {
        "created": CREATED,
        "architecture": arch,
        "os": "linux",
        "config": {
            "Env": ["PATH=/bin:/sbin:/usr/bin:/usr/sbin"],
            "Cmd": ["/bin/sh"],
            "WorkingDir": "/",
        },
        "rootfs": {"type": "layers", "diff_ids": [f"sha256:{_sha256(layer_tar)}"]},
        "history": [{"created": CREATED, "created_by": "flowcni tests/support/oci_image.py"}],
    }
    config_b = _canonical_json(config)
    manifest = {
        "schemaVersion": 2,
        "mediaType": MT_MANIFEST,
        "config": {
            "mediaType": MT_CONFIG,
            "digest": f"sha256:{_sha256(config_b)}",
            "size": len(config_b),
        },
        "layers": [
            {
                "mediaType": MT_LAYER_GZIP,
                "digest": f"sha256:{_sha256(layer_gz)}",
                "size": len(layer_gz),
            }
        ],
    }
    manifest_b = _canonical_json(manifest)
    index = {
        "schemaVersion": 2,
        "mediaType": MT_INDEX,
        "manifests": [
            {
                "mediaType": MT_MANIFEST,
                "digest": f"sha256:{_sha256(manifest_b)}",
                "size": len(manifest_b),
                "platform": {"architecture": arch, "os": "linux"},
                "annotations": {ANN_REF_NAME: name, ANN_CONTAINERD_NAME: name},
            }
        ],
    }
    out = _TarWriter()
    out.file("oci-layout", _canonical_json({"imageLayoutVersion": "1.0.0"}))
    out.file("index.json", _canonical_json(index))
    out.dir("blobs")
    out.dir("blobs/sha256")
    blobs = {_sha256(b): b for b in (config_b, manifest_b, layer_gz)}
    for hexdigest in sorted(blobs):
        out.file(f"blobs/sha256/{hexdigest}", blobs[hexdigest])
    digests = {
        "manifest": f"sha256:{_sha256(manifest_b)}",
        "config": f"sha256:{_sha256(config_b)}",
        "layer": f"sha256:{_sha256(layer_gz)}",
    }
    return out.close(), digests


def _atomic_write(path: str, data: bytes) -> None:
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-", suffix=".tar")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _copy_atomic(src: str, dest: str) -> None:
    if os.path.abspath(src) == os.path.abspath(dest):
        return
    d = os.path.dirname(os.path.abspath(dest))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-", suffix=".tar")
    os.close(fd)
    try:
        shutil.copyfile(src, tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, dest)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def build_busybox_oci_image(
    dest_tar: str,
    name: str = DEFAULT_NAME,
    *,
    busybox: str = BUSYBOX,
    cache_dir: str | None = None,
) -> OciImage:
    """Write the busybox oci-archive to ``dest_tar``; return its digests.

    The cache key is sha256(format version, image name, busybox binary); a cached
    archive is only reused if its sha256 still equals the one recorded beside it.
    Pass ``cache_dir=""`` to disable caching.
    """
    if cache_dir is None:
        cache_dir = os.environ.get("FLOWCNI_TEST_CACHE", DEFAULT_CACHE_DIR)
    with open(busybox, "rb") as f:
        busybox_bytes = f.read()
    key = _sha256(
        b"\0".join([FORMAT_VERSION.encode(), name.encode(), _sha256(busybox_bytes).encode()])
    )[:32]
    cached = os.path.join(cache_dir, f"busybox-oci-{key}.tar") if cache_dir else ""
    meta_path = cached + ".json"

    if cached and os.path.isfile(cached) and os.path.isfile(meta_path):
        try:
            with open(meta_path) as f:
                meta = json.load(f)
            if _file_sha256(cached) == meta["archive_sha256"]:
                _copy_atomic(cached, dest_tar)
                return OciImage(
                    path=dest_tar,
                    name=name,
                    manifest_digest=meta["manifest"],
                    config_digest=meta["config"],
                    layer_digest=meta["layer"],
                    archive_sha256=meta["archive_sha256"],
                    from_cache=True,
                )
        except (OSError, ValueError, KeyError):
            pass  # corrupt cache entry: rebuild below

    archive, digests = _build_archive(busybox_bytes, busybox_applets(busybox), name)
    archive_sha = _sha256(archive)
    _atomic_write(dest_tar, archive)
    if cached:
        try:
            _atomic_write(cached, archive)
            meta = dict(digests, archive_sha256=archive_sha, name=name)
            with open(meta_path + ".tmp", "w") as f:
                json.dump(meta, f, sort_keys=True)
            os.replace(meta_path + ".tmp", meta_path)
        except OSError:
            pass  # cache is best effort (read-only /var/cache, ...)
    return OciImage(
        path=dest_tar,
        name=name,
        manifest_digest=digests["manifest"],
        config_digest=digests["config"],
        layer_digest=digests["layer"],
        archive_sha256=archive_sha,
        from_cache=False,
    )


def build_busybox_oci(dest_tar: str, name: str = DEFAULT_NAME) -> str:
    """Build (or fetch from cache) the busybox oci-archive at ``dest_tar``; return its path."""
    return build_busybox_oci_image(dest_tar, name).path


if __name__ == "__main__":
    import sys

    img = build_busybox_oci_image(sys.argv[1] if len(sys.argv) > 1 else "/tmp/flowcni-busybox.tar")
    print(json.dumps(img.__dict__, indent=2))
