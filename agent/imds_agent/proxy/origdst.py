"""The address a redirected client originally dialled, read back from conntrack (SO_ORIGINAL_DST).

After a DNAT in the output path the accepted socket's local address is the listener's; the kernel keeps the
pre-NAT destination in the connection's conntrack entry, which these socket options expose for IPv4 and IPv6.
"""

from __future__ import annotations

import socket
import struct
from typing import Optional

SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h
IP6T_SO_ORIGINAL_DST = 80  # linux/netfilter_ipv6/ip6_tables.h
SOL_IPV6 = getattr(socket, "SOL_IPV6", 41)


def original_dst(sock: socket.socket) -> Optional[tuple[str, int]]:
    """Return (address, port) the client dialled before any NAT (conntrack's original destination), or None when
    the connection has no conntrack entry."""
    try:
        if sock.family == socket.AF_INET6:
            raw = sock.getsockopt(SOL_IPV6, IP6T_SO_ORIGINAL_DST, 28)
            port = struct.unpack_from("!H", raw, 2)[0]
            addr = socket.inet_ntop(socket.AF_INET6, raw[8:24])
            if addr.startswith("::ffff:"):
                addr = addr[len("::ffff:") :]
            return addr, port
        raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
        port = struct.unpack_from("!H", raw, 2)[0]
        return socket.inet_ntop(socket.AF_INET, raw[4:8]), port
    except OSError:
        # ENOENT: the connection has no conntrack entry (a direct connection to the listener, no NAT).
        return None
