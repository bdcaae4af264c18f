"""Drive real container runtimes (podman, containerd/ctr) as CNI clients in tests.

Standard library only.  Everything a helper creates lives under a private base
directory (a temp dir) and is removed again by the matching cleanup, which always
runs (context managers / ``finally``).

podman 4.3 (Debian 12)
----------------------
Default backend there is netavark.  The CNI backend is selected without touching any
global file by a private ``containers.conf`` passed through ``CONTAINERS_CONF``::

    [engine]
    cgroup_manager = "cgroupfs"     # no systemd on the test machines
    events_logger = "file"
    tmp_dir = "<base>/tmp"          # instead of /run/libpod
    runtime = "runc"                # crun 1.8 refuses hybrid cgroup v1/v2 hosts
    [network]
    network_backend = "cni"
    cni_plugin_dirs = ["<plugin dir>", ...]
    network_config_dir = "<conf dir>"   # *.conflist, network name = conflist "name"

plus global flags ``--root <base>/root --runroot <base>/runroot --storage-driver vfs``
so images/containers stay out of /var/lib/containers.  ``podman run`` additionally
needs ``--ulimit nofile=20000:20000 --ulimit nproc=4096:4096`` on these machines
(podman's default RLIMIT_NOFILE of 1048576 is above the hard limit, and runc fails
with "error setting rlimit type 7: operation not permitted").  conmon's exit command
repeats --root/--runroot/--network-config-dir/--network-backend/--runtime, and conmon
inherits ``CONTAINERS_CONF``, so the CNI DEL on container exit uses the same config.
Images: ``podman load -i <oci-archive>`` keeps the index's ref name.

containerd 1.6 / ``ctr run --cni``
----------------------------------
``ctr`` (not containerd) is the CNI client: it calls ``gocni.New(gocni.WithDefaultConf)``,
i.e. it reads the lexically *first* ``*.conf``/``*.conflist``/``*.json`` in
``/etc/cni/net.d`` and looks for plugins only in ``/opt/cni/bin``; neither can be changed
by flag, config or environment (CNI_PATH is ignored).  ``CNI_CONTAINERID`` is
``<namespace>-<id>`` and the interface is ``eth0``.  With ``-d`` ctr returns right after
ADD and nobody ever runs DEL (``--rm`` is ignored too), so the helpers run ``ctr run
--cni --rm`` in the *foreground* (as a background process); killing the task makes that
ctr process run CNI DEL (with an empty CNI_NETNS), delete the task and the container.

To point ctr elsewhere without touching the host, the default ``isolation="mountns"``
runs every ctr command in a private mount namespace (``unshare --mount
--propagation private``) where the test conf dir is bind-mounted on /etc/cni/net.d and
the test plugin dir on /opt/cni/bin (a missing mountpoint is made on a tmpfs that re-binds
the original entries of the parent directory).  ``isolation="global"`` instead installs
``/etc/cni/net.d/00-flowcni-test-*.conflist`` and plugin symlinks in /opt/cni/bin and
removes exactly what it added on cleanup.

The private containerd gets its own root/state/socket under the base dir, CRI disabled,
and ``--runc-root`` is passed to ``ctr run``; containerd 1.6 still hard-codes the shim
socket directory ``/run/containerd/s`` (removed on cleanup when empty and new).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

DEBIAN_CNI_DIR = "/usr/lib/cni"
PODMAN_ULIMITS: tuple[str, ...] = (
    "--ulimit",
    "nofile=20000:20000",
    "--ulimit",
    "nproc=4096:4096",
)
DEFAULT_TIMEOUT = 120.0


class RuntimeCommandError(Exception):
    """A runtime command failed; message carries argv, rc, stdout and stderr."""


def _fmt_failure(argv: Sequence[str], rc: int | None, out: str, err: str) -> str:
    return f"{' '.join(argv)} -> rc={rc}\nstdout: {out.strip()}\nstderr: {err.strip()}"


def _run(
    argv: Sequence[str],
    *,
    env: dict[str, str] | None = None,
    check: bool = True,
    timeout: float = DEFAULT_TIMEOUT,
    input_: str | None = None,
) -> subprocess.CompletedProcess[str]:
    try:
        cp = subprocess.run(
            list(argv),
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            input=input_,
            stdin=None if input_ is not None else subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        err = e.stderr.decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
        raise RuntimeCommandError(
            f"timeout after {timeout}s: " + _fmt_failure(argv, None, out, err)
        ) from e
    if check and cp.returncode != 0:
        raise RuntimeCommandError(_fmt_failure(argv, cp.returncode, cp.stdout, cp.stderr))
    return cp


# --------------------------------------------------------------------------- CNI config


def bridge_hostlocal_conflist(
    name: str,
    bridge: str,
    subnet: str,
    data_dir: str,
    *,
    cni_version: str = "1.0.0",
    is_gateway: bool = True,
    ip_masq: bool = False,
) -> dict[str, Any]:
    """A conflist for Debian's reference ``bridge`` plugin with ``host-local`` IPAM.

    ``ipMasq`` defaults to false so no iptables rule is ever added on the host.
    """
    return {
        "cniVersion": cni_version,
        "name": name,
        "plugins": [
            {
                "type": "bridge",
                "bridge": bridge,
                "isGateway": is_gateway,
                "ipMasq": ip_masq,
                "hairpinMode": False,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": subnet}]],
                    "dataDir": data_dir,
                },
            }
        ],
    }


def write_conflist(conf_dir: str, conflist: dict[str, Any], filename: str | None = None) -> str:
    """Write ``conflist`` as ``<conf_dir>/<filename or 10-NAME.conflist>``; return the path."""
    os.makedirs(conf_dir, exist_ok=True)
    path = os.path.join(conf_dir, filename or f"10-{conflist['name']}.conflist")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(conflist, f, indent=2)
    os.replace(tmp, path)
    return path


def conflist_plugin_types(conflist: dict[str, Any]) -> list[str]:
    """Plugin binaries a conflist needs (plugin types plus IPAM types)."""
    types: list[str] = []
    for plugin in conflist.get("plugins", []):
        for t in (plugin.get("type"), (plugin.get("ipam") or {}).get("type")):
            if t and t not in types:
                types.append(t)
    return types


def hostlocal_leases(data_dir: str, network: str) -> dict[str, str]:
    """host-local lease files of ``network``: {ip: container id}."""
    d = os.path.join(data_dir, network)
    leases: dict[str, str] = {}
    if not os.path.isdir(d):
        return leases
    for entry in os.listdir(d):
        if entry == "lock" or entry.startswith("last_reserved_ip"):
            continue
        with open(os.path.join(d, entry)) as f:
            lines = f.read().splitlines()
        leases[entry] = lines[0].strip() if lines else ""
    return leases


def delete_link(name: str) -> None:
    """``ip link del NAME`` if it exists (in the caller's netns)."""
    if os.path.exists(f"/sys/class/net/{name}"):
        _run(["ip", "link", "del", name], check=False, timeout=30)


# ---------------------------------------------------------------------- mount cleanup


def _mounts_under(base: str) -> list[str]:
    base = os.path.realpath(base)
    found: list[str] = []
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                parts = line.split()
                if len(parts) < 5:
                    continue
                mnt = parts[4].replace("\\040", " ")
                if mnt == base or mnt.startswith(base + "/"):
                    found.append(mnt)
    except OSError:
        pass
    return sorted(found, key=len, reverse=True)


def _umount_under(base: str) -> None:
    for mnt in _mounts_under(base):
        _run(["umount", "-l", mnt], check=False, timeout=30)


def _rmtree(path: str) -> None:
    if not os.path.exists(path):
        return
    _umount_under(path)
    shutil.rmtree(path, ignore_errors=True)


def _rmdir_chain_if_empty(paths: Sequence[str]) -> None:
    """rmdir each path (deepest first as given) when it is empty; ignore failures."""
    for p in paths:
        with contextlib.suppress(OSError):
            os.rmdir(p)


# ---------------------------------------------------------------------------- podman


@dataclass
class PodmanEnv:
    """A podman that uses the CNI backend with private config and storage.

    ``argv("run", ...)`` gives the full command line; ``env`` has CONTAINERS_CONF.
    """

    base_dir: str
    conf_dir: str
    plugin_dirs: list[str]
    runtime: str = "runc"
    storage_driver: str = "vfs"
    podman: str = "podman"

    @property
    def containers_conf(self) -> str:
        return os.path.join(self.base_dir, "containers.conf")

    @property
    def root(self) -> str:
        return os.path.join(self.base_dir, "root")

    @property
    def runroot(self) -> str:
        return os.path.join(self.base_dir, "runroot")

    @property
    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["CONTAINERS_CONF"] = self.containers_conf
        return env

    def global_args(self) -> list[str]:
        return [
            "--root",
            self.root,
            "--runroot",
            self.runroot,
            "--storage-driver",
            self.storage_driver,
        ]

    def argv(self, *args: str) -> list[str]:
        return [self.podman, *self.global_args(), *args]

    def run(
        self, *args: str, check: bool = True, timeout: float = DEFAULT_TIMEOUT
    ) -> subprocess.CompletedProcess[str]:
        return _run(self.argv(*args), env=self.env, check=check, timeout=timeout)

    def write_config(self) -> None:
        for d in (self.root, self.runroot, os.path.join(self.base_dir, "tmp")):
            os.makedirs(d, exist_ok=True)
        dirs = ", ".join(json.dumps(d) for d in self.plugin_dirs)
        text = f"""# written by flowcni tests/support/runtimes.py
[containers]
log_driver = "k8s-file"

[engine]
cgroup_manager = "cgroupfs"
events_logger = "file"
events_logfile_path = {json.dumps(os.path.join(self.base_dir, "events.log"))}
tmp_dir = {json.dumps(os.path.join(self.base_dir, "tmp"))}
volume_path = {json.dumps(os.path.join(self.base_dir, "volumes"))}
runtime = {json.dumps(self.runtime)}

[network]
network_backend = "cni"
cni_plugin_dirs = [{dirs}]
network_config_dir = {json.dumps(self.conf_dir)}
"""
        with open(self.containers_conf, "w") as f:
            f.write(text)


def podman_cni_env(
    conf_dir: str,
    plugin_dir: str | Sequence[str] = DEBIAN_CNI_DIR,
    base_dir: str | None = None,
    *,
    runtime: str = "runc",
    storage_driver: str = "vfs",
) -> PodmanEnv:
    """Prepare a private podman (CNI backend) reading conflists from ``conf_dir``.

    Writes ``<base_dir>/containers.conf``; call :func:`podman_cleanup` when done (or
    use :func:`podman_session`).
    """
    if base_dir is None:
        base_dir = tempfile.mkdtemp(prefix="flowcni-podman-")
    dirs = [plugin_dir] if isinstance(plugin_dir, str) else list(plugin_dir)
    penv = PodmanEnv(
        base_dir=base_dir,
        conf_dir=conf_dir,
        plugin_dirs=dirs,
        runtime=runtime,
        storage_driver=storage_driver,
    )
    penv.write_config()
    return penv


def podman_backend(penv: PodmanEnv) -> str:
    """What ``podman info`` reports as network backend (expect "cni")."""
    return penv.run("info", "--format", "{{.Host.NetworkBackend}}").stdout.strip()


def podman_load(penv: PodmanEnv, archive: str) -> str:
    """``podman load -i ARCHIVE`` (oci-archive); return the loaded image name."""
    out = penv.run("load", "-i", archive, timeout=300).stdout
    for line in out.splitlines():
        if line.startswith("Loaded image"):
            return line.split(":", 1)[1].strip()
    raise RuntimeCommandError(f"podman load printed no image name: {out!r}")


def podman_run(
    penv: PodmanEnv,
    image: str,
    network: str,
    cmd: Sequence[str] = ("sleep", "300"),
    *,
    name: str | None = None,
    extra_args: Sequence[str] = (),
    timeout: float = DEFAULT_TIMEOUT,
) -> str:
    """``podman run -d --network NETWORK`` with this machine's ulimits; return the id.

    On failure the (created but not started) container is removed before raising.
    """
    name = name or f"fc-{uuid.uuid4().hex[:12]}"
    args = ["run", "-d", "--name", name, "--network", network, *PODMAN_ULIMITS, *extra_args]
    cp = penv.run(*args, image, *cmd, check=False, timeout=timeout)
    if cp.returncode != 0:
        penv.run("rm", "-f", "-t", "0", name, check=False)
        raise RuntimeCommandError(
            _fmt_failure(penv.argv(*args, image, *cmd), cp.returncode, cp.stdout, cp.stderr)
        )
    return cp.stdout.strip().splitlines()[-1]


def podman_exec(
    penv: PodmanEnv, cid: str, *cmd: str, check: bool = True, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """``podman exec CID CMD...``."""
    return penv.run("exec", cid, *cmd, check=check, timeout=timeout)


def podman_rm(penv: PodmanEnv, cid: str, *, check: bool = True) -> None:
    """Stop (SIGKILL at once) and remove; podman tears the network down (CNI DEL)."""
    penv.run("rm", "-f", "-t", "0", cid, check=check)


def podman_cleanup(penv: PodmanEnv, *, remove_base: bool = True) -> None:
    """Remove every container of this private podman, then its storage and config."""
    with contextlib.suppress(Exception):
        penv.run("rm", "-a", "-f", "-t", "0", check=False, timeout=180)
    with contextlib.suppress(Exception):
        penv.run("rmi", "-a", "-f", check=False, timeout=120)
    if remove_base:
        _rmtree(penv.base_dir)


@contextlib.contextmanager
def podman_session(
    conf_dir: str,
    plugin_dir: str | Sequence[str] = DEBIAN_CNI_DIR,
    base_dir: str | None = None,
    **kwargs: Any,
) -> Iterator[PodmanEnv]:
    """:func:`podman_cni_env` + :func:`podman_cleanup` in ``finally``."""
    penv = podman_cni_env(conf_dir, plugin_dir, base_dir, **kwargs)
    try:
        yield penv
    finally:
        podman_cleanup(penv)


# ------------------------------------------------------------------------ containerd

# Runs ctr in a private mount namespace with $FLOWCNI_CNI_CONF on /etc/cni/net.d and
# $FLOWCNI_CNI_BIN on /opt/cni/bin.  A missing mountpoint is created on a tmpfs laid on
# its deepest existing ancestor, after re-binding that ancestor's original entries.
_MOUNTNS_SCRIPT = r"""
set -eu
stash_n=0
ensure_dir() {
    target=$1
    [ -d "$target" ] && return 0
    anc=$target
    while [ ! -e "$anc" ]; do anc=$(dirname "$anc"); done
    stash_n=$((stash_n + 1))
    stash="$FLOWCNI_STASH/$stash_n"
    mkdir -p "$stash"
    mount --bind "$anc" "$stash"
    mount -t tmpfs -o mode=0755 flowcni-test "$anc"
    for e in "$stash"/* "$stash"/.[!.]*; do
        [ -e "$e" ] || [ -L "$e" ] || continue
        n=${e##*/}
        if [ -L "$e" ]; then ln -s "$(readlink "$e")" "$anc/$n"
        elif [ -d "$e" ]; then mkdir "$anc/$n"; mount --rbind "$e" "$anc/$n"
        else : > "$anc/$n"; mount --bind "$e" "$anc/$n"
        fi
    done
    mkdir -p "$target"
}
ensure_dir /etc/cni/net.d
ensure_dir /opt/cni/bin
mount --bind "$FLOWCNI_CNI_CONF" /etc/cni/net.d
mount --bind "$FLOWCNI_CNI_BIN" /opt/cni/bin
exec "$@"
"""

Isolation = Literal["mountns", "global"]


@dataclass
class CtrContainer:
    """A container started by :meth:`PrivateContainerd.run` (ctr run --cni --rm)."""

    id: str
    cni_container_id: str  # what the CNI plugins see as CNI_CONTAINERID
    proc: subprocess.Popen[bytes]
    log_path: str

    def log(self) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()
        except OSError:
            return ""


@dataclass
class PrivateContainerd:
    """A containerd of our own (socket, root, state under ``base_dir``) plus ctr helpers."""

    base_dir: str
    cni_conf_dir: str  # what ctr will see as /etc/cni/net.d
    cni_bin_dir: str  # what ctr will see as /opt/cni/bin
    isolation: Isolation = "mountns"
    namespace: str = "flowcni-test"
    snapshotter: str = "native"
    proc: subprocess.Popen[bytes] | None = None
    containers: dict[str, CtrContainer] = field(default_factory=dict)
    _global_added: list[str] = field(default_factory=list)
    _global_dirs: list[str] = field(default_factory=list)
    _run_containerd_existed: bool = True

    @property
    def socket(self) -> str:
        return os.path.join(self.base_dir, "containerd.sock")

    @property
    def log_path(self) -> str:
        return os.path.join(self.base_dir, "containerd.log")

    @property
    def runc_root(self) -> str:
        return os.path.join(self.base_dir, "runc")

    @property
    def fifo_dir(self) -> str:
        return os.path.join(self.base_dir, "fifo")

    # ----- argv helpers

    def ctr_argv(self, *args: str) -> list[str]:
        """Plain ``ctr -a SOCK -n NS ARGS`` (no CNI isolation)."""
        return ["ctr", "-a", self.socket, "-n", self.namespace, *args]

    def ctr_cni_argv(self, *args: str) -> list[str]:
        """``ctr`` wrapped so that its CNI view is ``cni_conf_dir``/``cni_bin_dir``."""
        argv = self.ctr_argv(*args)
        if self.isolation == "global":
            return argv
        return [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            _MOUNTNS_SCRIPT,
            "flowcni-ctr",
            *argv,
        ]

    def _cni_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["FLOWCNI_CNI_CONF"] = self.cni_conf_dir
        env["FLOWCNI_CNI_BIN"] = self.cni_bin_dir
        env["FLOWCNI_STASH"] = os.path.join(self.base_dir, "stash")
        return env

    def ctr(
        self, *args: str, check: bool = True, timeout: float = DEFAULT_TIMEOUT
    ) -> subprocess.CompletedProcess[str]:
        return _run(self.ctr_argv(*args), check=check, timeout=timeout)

    # ----- lifecycle

    def write_config(self) -> str:
        for d in ("root", "state", "opt", "fifo", "runc", "stash", "tmp"):
            os.makedirs(os.path.join(self.base_dir, d), exist_ok=True)
        b = self.base_dir
        text = f"""# written by flowcni tests/support/runtimes.py
version = 2
root = {json.dumps(os.path.join(b, "root"))}
state = {json.dumps(os.path.join(b, "state"))}
temp = {json.dumps(os.path.join(b, "tmp"))}
disabled_plugins = [
  "io.containerd.grpc.v1.cri",
  "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.zfs",
  "io.containerd.tracing.processor.v1.otlp",
  "io.containerd.internal.v1.tracing",
]

[grpc]
  address = {json.dumps(self.socket)}

[ttrpc]
  address = {json.dumps(self.socket + ".ttrpc")}

[debug]
  address = {json.dumps(os.path.join(b, "debug.sock"))}

[plugins]
  [plugins."io.containerd.internal.v1.opt"]
    path = {json.dumps(os.path.join(b, "opt"))}
"""
        path = os.path.join(b, "config.toml")
        with open(path, "w") as f:
            f.write(text)
        return path

    def start(self, timeout: float = 30) -> None:
        self._run_containerd_existed = os.path.exists("/run/containerd")
        config = self.write_config()
        log = open(self.log_path, "ab")
        try:
            self.proc = subprocess.Popen(
                ["containerd", "--config", config],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        finally:
            log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeCommandError(
                    f"containerd exited rc={self.proc.returncode}:\n{self._tail()}"
                )
            if os.path.exists(self.socket):
                cp = _run(["ctr", "-a", self.socket, "version"], check=False, timeout=10)
                if cp.returncode == 0:
                    break
            time.sleep(0.1)
        else:
            raise RuntimeCommandError(f"containerd not ready after {timeout}s:\n{self._tail()}")
        if self.isolation == "global":
            self._install_global()

    def _tail(self, n: int = 30) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(f.readlines()[-n:])
        except OSError:
            return ""

    def _install_global(self) -> None:
        """Install the test conflist first in /etc/cni/net.d and plugins in /opt/cni/bin."""
        for d in ("/etc/cni", "/etc/cni/net.d", "/opt/cni", "/opt/cni/bin"):
            if not os.path.isdir(d):
                os.makedirs(d)
                self._global_dirs.insert(0, d)
        tag = os.path.basename(self.base_dir)
        confs = sorted(
            f for f in os.listdir(self.cni_conf_dir) if f.endswith((".conf", ".conflist", ".json"))
        )
        if not confs:
            raise RuntimeCommandError(f"no CNI config in {self.cni_conf_dir}")
        # gocni takes the lexically first file: "00-flowcni-test-" must sort first.
        dst = f"/etc/cni/net.d/00-flowcni-test-{tag}-{confs[0]}"
        shutil.copyfile(os.path.join(self.cni_conf_dir, confs[0]), dst)
        self._global_added.append(dst)
        for plugin in os.listdir(self.cni_bin_dir):
            target = os.path.join("/opt/cni/bin", plugin)
            if not os.path.lexists(target):
                os.symlink(os.path.realpath(os.path.join(self.cni_bin_dir, plugin)), target)
                self._global_added.append(target)

    def _uninstall_global(self) -> None:
        for p in reversed(self._global_added):
            with contextlib.suppress(OSError):
                os.unlink(p)
        self._global_added.clear()
        _rmdir_chain_if_empty(self._global_dirs)
        self._global_dirs.clear()

    # ----- images and containers

    def import_image(self, archive: str, timeout: float = 300) -> None:
        """``ctr images import`` an oci-archive (unpacked for our snapshotter)."""
        self.ctr("images", "import", "--snapshotter", self.snapshotter, archive, timeout=timeout)

    def run(
        self,
        image: str,
        cid: str | None = None,
        cmd: Sequence[str] = ("sleep", "300"),
        *,
        extra_args: Sequence[str] = (),
        timeout: float = 60,
    ) -> CtrContainer:
        """``ctr run --cni --rm`` in the background; return once the task is RUNNING.

        The ctr process does CNI ADD before starting the task and CNI DEL once the
        task exits (see :meth:`remove`).
        """
        cid = cid or f"fc-{uuid.uuid4().hex[:12]}"
        log_path = os.path.join(self.base_dir, f"ctr-run-{cid}.log")
        argv = self.ctr_cni_argv(
            "run",
            "--cni",
            "--rm",
            "--null-io",
            "--snapshotter",
            self.snapshotter,
            "--runc-root",
            self.runc_root,
            *extra_args,
            image,
            cid,
            *cmd,
        )
        log = open(log_path, "ab")
        try:
            proc = subprocess.Popen(
                argv,
                env=self._cni_env(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        finally:
            log.close()
        ctr = CtrContainer(
            id=cid, cni_container_id=f"{self.namespace}-{cid}", proc=proc, log_path=log_path
        )
        self.containers[cid] = ctr
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                self.containers.pop(cid, None)
                self._force_remove(cid)
                raise RuntimeCommandError(
                    f"ctr run exited rc={proc.returncode} before the task ran:\n{ctr.log()}"
                )
            if self.task_status(cid) == "RUNNING":
                return ctr
            time.sleep(0.1)
        self.remove(cid)
        raise RuntimeCommandError(f"task {cid} not RUNNING after {timeout}s:\n{ctr.log()}")

    def task_status(self, cid: str) -> str | None:
        cp = self.ctr("tasks", "ls", check=False, timeout=30)
        for line in cp.stdout.splitlines()[1:]:
            parts = line.split()
            if len(parts) >= 3 and parts[0] == cid:
                return parts[2]
        return None

    def exec(
        self, cid: str, *cmd: str, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        """``ctr task exec`` (FIFOs under our base dir)."""
        exec_id = f"x{uuid.uuid4().hex[:10]}"
        return self.ctr(
            "tasks",
            "exec",
            "--fifo-dir",
            self.fifo_dir,
            "--exec-id",
            exec_id,
            cid,
            *cmd,
            check=check,
            timeout=timeout,
        )

    def remove(self, cid: str, timeout: float = 60) -> int | None:
        """SIGKILL the task; the waiting ``ctr run`` does CNI DEL and deletes it.

        Returns ctr run's exit code (137 after SIGKILL), or None if it had to be
        killed.  Leftovers (task, container) are force-deleted in any case.
        """
        ctr = self.containers.pop(cid, None)
        self.ctr("tasks", "kill", "-s", "SIGKILL", cid, check=False, timeout=30)
        rc: int | None = None
        if ctr is not None:
            try:
                rc = ctr.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                ctr.proc.kill()
                ctr.proc.wait(timeout=30)
        self._force_remove(cid)
        return rc

    def _force_remove(self, cid: str) -> None:
        self.ctr("tasks", "kill", "-s", "SIGKILL", cid, check=False, timeout=30)
        for _ in range(50):
            status = self.task_status(cid)
            if status is None:
                break
            if status == "STOPPED":
                self.ctr("tasks", "delete", "-f", cid, check=False, timeout=30)
            time.sleep(0.1)
        self.ctr("containers", "delete", cid, check=False, timeout=30)

    def stop(self) -> None:
        """Remove all containers, stop containerd, kill its shims, remove the base dir."""
        try:
            if self.proc is not None and self.proc.poll() is None:
                for cid in list(self.containers):
                    with contextlib.suppress(Exception):
                        self.remove(cid)
                with contextlib.suppress(Exception):
                    cp = self.ctr("containers", "ls", "-q", check=False, timeout=30)
                    for cid in cp.stdout.split():
                        self._force_remove(cid)
            for ctr in self.containers.values():
                if ctr.proc.poll() is None:
                    ctr.proc.kill()
                    ctr.proc.wait(timeout=30)
            self.containers.clear()
        finally:
            try:
                self._stop_daemon()
            finally:
                try:
                    self._uninstall_global()
                finally:
                    _rmtree(self.base_dir)
                    if not self._run_containerd_existed:
                        _rmdir_chain_if_empty(
                            ["/run/containerd/s", "/run/containerd/runc", "/run/containerd"]
                        )

    def _stop_daemon(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=15)
        # Shims re-parent to init; find ours by our socket in their command line.
        for pid in _pids_with_arg(self.socket):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _pids_with_arg(arg: str) -> list[int]:
    pids: list[int] = []
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
        except OSError:
            continue
        if arg.encode() in args:
            pids.append(int(entry))
    return pids


def start_containerd(
    cni_conf_dir: str,
    cni_bin_dir: str,
    base_dir: str | None = None,
    *,
    isolation: Isolation = "mountns",
    snapshotter: str = "native",
    namespace: str = "flowcni-test",
) -> PrivateContainerd:
    """Start a private containerd; ctr's CNI view will be ``cni_conf_dir``/``cni_bin_dir``.

    ``cni_bin_dir`` must hold (links to) every plugin the conflist uses, see
    :func:`make_plugin_dir`.  Call :meth:`PrivateContainerd.stop` when done (or use
    :func:`containerd_session`).
    """
    if base_dir is None:
        base_dir = tempfile.mkdtemp(prefix="flowcni-containerd-")
    cd = PrivateContainerd(
        base_dir=base_dir,
        cni_conf_dir=cni_conf_dir,
        cni_bin_dir=cni_bin_dir,
        isolation=isolation,
        snapshotter=snapshotter,
        namespace=namespace,
    )
    try:
        cd.start()
    except BaseException:
        cd.stop()
        raise
    return cd


@contextlib.contextmanager
def containerd_session(
    cni_conf_dir: str,
    cni_bin_dir: str,
    base_dir: str | None = None,
    **kwargs: Any,
) -> Iterator[PrivateContainerd]:
    """:func:`start_containerd` + :meth:`PrivateContainerd.stop` in ``finally``."""
    cd = start_containerd(cni_conf_dir, cni_bin_dir, base_dir, **kwargs)
    try:
        yield cd
    finally:
        cd.stop()


def make_plugin_dir(dest: str, plugins: Sequence[str], src_dir: str = DEBIAN_CNI_DIR) -> str:
    """A dir with symlinks ``dest/<plugin> -> src_dir/<plugin>`` (for ctr's /opt/cni/bin)."""
    os.makedirs(dest, exist_ok=True)
    for p in plugins:
        src = os.path.join(src_dir, p)
        if not os.path.exists(src):
            raise FileNotFoundError(src)
        link = os.path.join(dest, p)
        if os.path.lexists(link):
            os.unlink(link)
        os.symlink(src, link)
    return dest
