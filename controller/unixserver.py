"""The agent's unix socket servers (the CNI socket and the agent API socket).

Both answer one request per connection on a thread each, and both must never be
reachable by anyone but root (or one named group, for the API): the socket is
created under a umask so it is never briefly world-accessible, in a directory
only its owner (and that group) may enter. One place for that, so the two
sockets cannot drift apart in how they protect themselves.
"""

from __future__ import annotations

import os
import socketserver
import threading
from typing import Any


class Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    # socketserver's default backlog of 5 makes a burst of plugin calls (a node
    # starting 50 pods at once) fail to connect with EAGAIN; the kernel caps this
    # at net.core.somaxconn.
    request_queue_size = 1024
    context: Any  # what the connection handler serves (a dispatcher, an API)


# Directories a live server of this process opened to a group (path -> gid): the
# CNI socket and the API socket share /run/flowcni by default, and a root-only
# socket made after a group one must not take the group's way in away again.
_group_dirs: dict[str, int] = {}
_group_dirs_lock = threading.Lock()


class UnixServer:
    """A root-only socket at `path`: mode 0600 in a 0700 directory, or with `gid`
    0660 in a 0710 directory of that group. A directory shared with a group
    socket stays 0710 (the root-only socket's own 0600 keeps the group out)."""

    def __init__(self, path: str, conn: type[socketserver.BaseRequestHandler], context: Any,
                 name: str, gid: int = -1) -> None:
        self.path = path
        d = self._dir = os.path.realpath(os.path.dirname(path) or ".")
        os.makedirs(d, mode=0o700, exist_ok=True)
        with _group_dirs_lock:
            if gid >= 0:
                other = _group_dirs.get(d, gid)
                if other != gid:
                    raise ValueError(f"{d} is already open to group {other}; a socket for "
                                     f"group {gid} needs a directory of its own")
                _group_dirs[d] = gid
                os.chown(d, -1, gid)
            os.chmod(d, 0o710 if d in _group_dirs else 0o700)
        self._gid = gid
        if os.path.exists(path):
            os.unlink(path)
        old = os.umask(0o177)
        try:
            self.server = Server(path, conn)
        finally:
            os.umask(old)
        if gid >= 0:
            os.chown(path, -1, gid)
        os.chmod(path, 0o660 if gid >= 0 else 0o600)
        self.server.context = context
        self.thread = threading.Thread(target=self.server.serve_forever, name=name,
                                       daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        if self._gid >= 0:
            with _group_dirs_lock:
                _group_dirs.pop(self._dir, None)
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
