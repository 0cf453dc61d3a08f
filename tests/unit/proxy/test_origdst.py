"""SO_ORIGINAL_DST: the pre-NAT destination decoded from the raw sockaddr the kernel hands back."""

from __future__ import annotations

import errno
import socket
import struct
from typing import Any, Optional

from imds_agent.proxy.origdst import original_dst


class FakeSocket:
    """Answers getsockopt with crafted bytes (or an error) and records what was asked."""

    def __init__(self, family: int, raw: Optional[bytes] = None, error: Optional[OSError] = None):
        self.family = family
        self.raw = raw
        self.error = error
        self.asked: list[tuple[int, int, int]] = []

    def getsockopt(self, level: int, option: int, buflen: int) -> bytes:
        self.asked.append((level, option, buflen))
        if self.error is not None:
            raise self.error
        assert self.raw is not None
        return self.raw


def sockaddr_in(addr: str, port: int) -> bytes:
    """struct sockaddr_in: family (host order), port (network order), address, 8 bytes of padding."""
    return (
        struct.pack("=H", socket.AF_INET) + struct.pack("!H", port) + socket.inet_pton(socket.AF_INET, addr) + bytes(8)
    )


def sockaddr_in6(addr: str, port: int, flowinfo: int = 0, scope_id: int = 0) -> bytes:
    """struct sockaddr_in6: family, port, flowinfo, 16-byte address, scope id (28 bytes)."""
    packed = socket.inet_pton(socket.AF_INET6, addr)
    return (
        struct.pack("=H", socket.AF_INET6) + struct.pack("!HI", port, flowinfo) + packed + struct.pack("=I", scope_id)
    )


def dst(sock: FakeSocket) -> Any:
    return original_dst(sock)  # type: ignore[arg-type]


def test_ipv4_destination_is_decoded_from_sockaddr_in() -> None:
    sock = FakeSocket(socket.AF_INET, sockaddr_in("169.254.169.254", 80))
    assert dst(sock) == ("169.254.169.254", 80)
    assert sock.asked == [(socket.SOL_IP, 80, 16)]  # SO_ORIGINAL_DST, a sockaddr_in's size


def test_port_is_in_network_byte_order() -> None:
    assert dst(FakeSocket(socket.AF_INET, sockaddr_in("10.1.2.3", 8775))) == ("10.1.2.3", 8775)


def test_ipv6_destination_is_decoded_from_sockaddr_in6() -> None:
    sock = FakeSocket(socket.AF_INET6, sockaddr_in6("fd00:ec2::254", 80, flowinfo=0x12345, scope_id=7))
    assert dst(sock) == ("fd00:ec2::254", 80)
    assert sock.asked == [(41, 80, 28)]  # SOL_IPV6, IP6T_SO_ORIGINAL_DST, a sockaddr_in6's size


def test_a_v4_mapped_destination_on_a_v6_socket_is_the_plain_v4_address() -> None:
    sock = FakeSocket(socket.AF_INET6, sockaddr_in6("::ffff:169.254.169.254", 8080))
    assert dst(sock) == ("169.254.169.254", 8080)


def test_no_conntrack_entry_is_none() -> None:
    for family in (socket.AF_INET, socket.AF_INET6):
        sock = FakeSocket(family, error=OSError(errno.ENOENT, "No such file or directory"))
        assert dst(sock) is None
