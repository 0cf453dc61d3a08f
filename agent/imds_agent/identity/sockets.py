"""Which socket is on the other end of an accepted connection: an exact sock_diag lookup by 4-tuple.

The client's socket sees itself as connected to the metadata address (the DNAT happened below it), so the lookup
uses the client's view: source = our peer, destination = SO_ORIGINAL_DST (or our own address when the client
connected to the listener directly). One netlink request without NLM_F_DUMP asks the kernel for exactly that
socket, which costs microseconds whatever the number of sockets on the host; walking every socket (what
psutil.net_connections() does) costs milliseconds to hundreds of milliseconds.
"""

from __future__ import annotations

import itertools
import logging
import os
import socket
import struct
import threading
from dataclasses import dataclass
from typing import Optional

from pyroute2.netlink import NETLINK_SOCK_DIAG, NLM_F_REQUEST, NLMSG_ERROR
from pyroute2.netlink.diag import SOCK_DIAG_BY_FAMILY, SS_ALL

log = logging.getLogger(__name__)

INET_DIAG_NOCOOKIE = 0xFFFFFFFFFFFFFFFF  # ask the kernel not to compare socket cookies
# struct nlmsghdr + struct inet_diag_req_v2 (linux/inet_diag.h); the address words are big-endian.
_HEAD = struct.Struct("=IHHIIBBBxI")
_SOCKID = struct.Struct(">HH4I4I")
_TAIL = struct.Struct("=IQ")
_REQUEST_SIZE = _HEAD.size + _SOCKID.size + _TAIL.size
_HEADER = struct.Struct("=IHHII")
_UID_INODE = struct.Struct("=II")
_UID_OFFSET = 16 + 4 + 48 + 12  # nlmsghdr, family/state/timer/retrans, sockid, expires/rqueue/wqueue
_COOKIE = struct.Struct("=II")
_COOKIE_OFFSET = 16 + 4 + 40  # nlmsghdr, family/state/timer/retrans, sockid up to idiag_cookie


@dataclass(frozen=True)
class SocketOwner:
    """What the kernel says about the client's socket: who created it and its inode (to find the process)."""

    uid: int
    inode: int
    cookie: int = 0  # the kernel's socket cookie (the ebpf backend's connect records are keyed by it)


def _words(address: str) -> tuple[int, ...]:
    """An address as the four big-endian 32-bit words of inet_diag_sockid (inet_pton: this runs per connection)."""
    if ":" in address:
        return struct.unpack(">4I", socket.inet_pton(socket.AF_INET6, address))
    return struct.unpack(">I", socket.inet_pton(socket.AF_INET, address)) + (0, 0, 0)


def _unmapped(address: str) -> str:
    """'::ffff:10.0.0.1' (an IPv4 client on a dual-stack socket) as '10.0.0.1'."""
    if address.startswith("::ffff:") and "." in address:
        return address[7:]
    return address


def encode_request(seq: int, src: tuple[str, int], dst: tuple[str, int]) -> bytes:
    """The SOCK_DIAG_BY_FAMILY request (no NLM_F_DUMP: one exact socket) for a TCP socket src -> dst."""
    family = socket.AF_INET6 if ":" in src[0] else socket.AF_INET
    return (
        _HEAD.pack(_REQUEST_SIZE, SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST, seq, 0, family, socket.IPPROTO_TCP, 0, SS_ALL)
        + _SOCKID.pack(src[1], dst[1], *_words(src[0]), *_words(dst[0]))
        + _TAIL.pack(0, INET_DIAG_NOCOOKIE)
    )


def decode_reply(data: bytes) -> Optional[SocketOwner]:
    """The owner from an inet_diag_msg reply; None for ENOENT; OSError for any other netlink error."""
    _, msg_type, _, _, _ = _HEADER.unpack_from(data)
    if msg_type == NLMSG_ERROR:
        code = -struct.unpack_from("=i", data, _HEADER.size)[0]
        if code in (0, 2):  # ENOENT: no such socket (closed already, or not a local one)
            return None
        raise OSError(code, f"sock_diag lookup failed: {os.strerror(code)}")
    uid, inode = _UID_INODE.unpack_from(data, _UID_OFFSET)
    low, high = _COOKIE.unpack_from(data, _COOKIE_OFFSET)
    return SocketOwner(uid=uid, inode=inode, cookie=low | high << 32)


class SocketLookup:
    """Exact TCP socket lookups over one sock_diag netlink socket, shared by connection threads under a lock.

    pyroute2 supplies the protocol constants; the 72-byte request is packed here because pyroute2's generic
    marshalling costs about 100-350 us per request, ten times the kernel's work, on the per-connection path.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sock: Optional[socket.socket] = None
        self._seq = itertools.count(1)

    def owner(self, src: tuple[str, int], dst: tuple[str, int]) -> Optional[SocketOwner]:
        """The TCP socket whose local address is ``src`` and remote address ``dst``, or None if there is none.

        Raises OSError when the netlink socket itself fails (the caller then treats the client as unknown).
        """
        src = (_unmapped(src[0]), src[1])
        dst = (_unmapped(dst[0]), dst[1])
        if (":" in src[0]) != (":" in dst[0]):
            return None
        with self._lock:
            try:
                if self._sock is None:
                    self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_SOCK_DIAG)
                    self._sock.settimeout(1.0)
                    self._sock.bind((0, 0))
                self._sock.send(encode_request(next(self._seq), src, dst))
                data = self._sock.recv(8192)
            except OSError:
                # Start afresh next time rather than fail forever on a broken socket.
                self._close()
                raise
        return decode_reply(data)

    def _close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def close(self) -> None:
        """Close the netlink socket."""
        with self._lock:
            self._close()
