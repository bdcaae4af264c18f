"""os-ken as the agent runs it: OpenFlow 1.3 only, and no packet library until used.

Why: before it holds any state, the agent's RSS is mostly imports, and a
quarter of them were parts of os-ken it never runs. Two os-ken modules
import far more than they are asked for (a fresh interpreter, `import
flowcni.controller.agent`: 51.8 -> 40.0 MB RSS, 477 -> 436 modules; the
agent at 99k flows: 148-149 -> 135-136 MB, same lab, alternating):

- `os_ken.ofproto.ofproto_protocol` imports the constants and parsers of
  every OpenFlow version (1.0, 1.2, 1.3, 1.4, 1.5) to fill its version table.
  The agent speaks only 1.3 (`FlowcniOFApp.OFP_VERSIONS`), and os-ken
  narrows the table to the apps' versions before any session starts, so
  the other four parsers are never used. They cost 4.4 MB.
- `os_ken.lib.packet` imports every protocol it can parse: BGP, OSPF, Zebra
  (which loads os-ken's oslo.config flags), DHCP, LLDP, ... The 1.3 parser
  imports it only to ask, when a packet-out is serialized, whether its data
  is an os-ken `Packet`; the agent's own frames are bytes (frames.py). 6.5 MB.

So, in a process where `install()` ran:

- This module is `os_ken.ofproto.ofproto_protocol`: the same four names
  (`_versions`, `_supported_versions`, `set_app_supported_versions`,
  `ProtocolDesc`) with os-ken's semantics, and only 1.3 in the table.
- One message of another version still arrives: the switch's HELLO, sent in
  the highest version the bridge allows (1.5, ovsdb/bridge.py PROTOCOLS)
  before a version is agreed. os-ken reads its version bitmap with that
  version's parser; here 1.3's parser reads it, the same code in 1.3, 1.4 and
  1.5 (1.0's and 1.2's HELLO have no elements and are read without, as in
  os-ken). Any other message of another version is logged and skipped.
- `os_ken.lib.packet` is a package with the real one's path whose submodules
  load when first asked for (`from os_ken.lib.packet import tcp` works and
  loads what tcp needs), without its `__init__`'s load-everything.
- The 1.3 parser's `packet` name answers `Packet` with a class nothing is an
  instance of until os-ken's packet module is loaded, then with the real
  class: no object can be an instance of a class not yet defined, so its
  `isinstance` check answers as before.

Nothing on disk is changed. `install()` does nothing in a process that has
already imported `os_ken.ofproto` or `os_ken.lib.packet` (os-ken is then
whole, as shipped). flowctl and the CNI plugin never call it; the agent does,
in ofapp.py, before anything else from os-ken. tests/unit/test_oskenlite.py
checks that the agent's import leaves the rest out, that a session's messages
are the same bytes, and that the switch's HELLO reads the same, as with
os-ken whole.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import sys
import types
from typing import Any

LOG = logging.getLogger(__name__)

_PROTOCOL = "os_ken.ofproto.ofproto_protocol"
_PACKAGE = "os_ken.lib.packet"
_PACKET = "os_ken.lib.packet.packet"

# -- os_ken.ofproto.ofproto_protocol, OpenFlow 1.3 only ------------------------
# The names and behaviour of os-ken's module; filled by install().

_versions: dict[int, tuple[types.ModuleType, types.ModuleType]] = {}
_supported_versions: set[int] = set()


def set_app_supported_versions(vers: Any) -> None:
    """Narrow the versions sessions may use to those every app supports (os-ken's)."""
    global _supported_versions
    _supported_versions &= set(vers)
    assert _supported_versions, "No OpenFlow version is available"


class ProtocolDesc:
    """OpenFlow protocol version flavor descriptor (os-ken's, for the table above)."""

    def __init__(self, version: int | None = None) -> None:
        if version is None:
            version = max(_supported_versions)
        self.set_version(version)

    def set_version(self, version: int) -> None:
        assert version in _supported_versions
        (self.ofproto, self.ofproto_parser) = _versions[version]

    @property
    def supported_ofp_version(self) -> set[int]:
        return _supported_versions


#: The versions os-ken ships parsers for, besides 1.3: 1.0, 1.2, 1.4, 1.5.
_OTHER_VERSIONS = (0x01, 0x03, 0x05, 0x06)


def _other_version_msg(datapath: Any, version: int, msg_type: int, msg_len: int, xid: int,
                       buf: Any) -> Any:
    """A message in a version whose parser is not loaded: the switch's HELLO, or nothing."""
    from os_ken.ofproto import ofproto_v1_3, ofproto_v1_3_parser

    hello = ofproto_v1_3_parser.OFPHello
    if msg_type != ofproto_v1_3.OFPT_HELLO:
        LOG.warning("OpenFlow message of type %d in version 0x%02x ignored: the agent "
                    "speaks OpenFlow 1.3 only", msg_type, version)
        return None
    if version < ofproto_v1_3.OFP_VERSION:
        return super(hello, hello).parser(datapath, version, msg_type, msg_len, xid, buf)
    return hello.parser(datapath, version, msg_type, msg_len, xid, buf)


# -- os_ken.lib.packet, loaded on first use -------------------------------------


class _NoPacketLoaded:
    """os-ken's `Packet` while its module is not loaded: nothing is an instance."""

    @classmethod
    def from_jsondict(cls, *args: Any, **kwargs: Any) -> Any:
        return importlib.import_module(_PACKET).Packet.from_jsondict(*args, **kwargs)


class _PacketName(types.ModuleType):
    """What the 1.3 parser's `from os_ken.lib.packet import packet` binds."""

    def __getattr__(self, name: str) -> Any:
        if name == "Packet":
            # A module being loaded by another thread may not define it yet: then
            # no instance exists yet either.
            cls = getattr(sys.modules.get(_PACKET), "Packet", None)
            return _NoPacketLoaded if cls is None else cls
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(importlib.import_module(_PACKET), name)


def _packet_package() -> types.ModuleType:
    spec = importlib.util.find_spec(_PACKAGE)
    assert spec is not None and spec.submodule_search_locations is not None
    pkg = types.ModuleType(_PACKAGE, "os-ken's packet library; submodules load on first use "
                           "(flowcni.controller.oskenlite).")
    pkg.__spec__ = spec
    pkg.__path__ = list(spec.submodule_search_locations)
    pkg.__file__ = spec.origin
    pkg.__package__ = _PACKAGE
    pkg.__loader__ = spec.loader

    def submodule(name: str) -> types.ModuleType:
        if name.startswith("__"):
            raise AttributeError(name)
        try:
            return importlib.import_module(f"{_PACKAGE}.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"{_PACKAGE}.{name}":
                raise
            raise AttributeError(f"module {_PACKAGE!r} has no attribute {name!r}") from None

    pkg.__getattr__ = submodule  # type: ignore[method-assign]
    return pkg


def install() -> bool:
    """Make this process's os-ken the trimmed one; False if os-ken's own is already loaded."""
    if any(m in sys.modules for m in ("os_ken.ofproto", _PROTOCOL, _PACKAGE)):
        return False
    import os_ken.lib

    pkg = _packet_package()
    sys.modules[_PACKAGE] = pkg
    os_ken.lib.packet = pkg  # type: ignore[attr-defined]
    me = sys.modules[__name__]
    sys.modules[_PROTOCOL] = me
    # Held only while the parser binds it: afterwards `from os_ken.lib.packet
    # import packet` gets the real module, as anywhere else.
    pkg.packet = _PacketName(_PACKET)  # type: ignore[attr-defined]
    try:
        from os_ken.ofproto import ofproto_v1_3, ofproto_v1_3_parser
    finally:
        del pkg.packet  # type: ignore[attr-defined]
    _versions[ofproto_v1_3.OFP_VERSION] = (ofproto_v1_3, ofproto_v1_3_parser)
    _supported_versions.add(ofproto_v1_3.OFP_VERSION)
    import os_ken.ofproto
    from os_ken.ofproto import ofproto_parser
    os_ken.ofproto.ofproto_protocol = me  # type: ignore[attr-defined]
    for v in _OTHER_VERSIONS:
        ofproto_parser.register_msg_parser(v)(_other_version_msg)
    return True
