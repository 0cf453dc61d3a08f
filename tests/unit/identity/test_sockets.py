"""The sock_diag request and reply codec, cross-checked against pyroute2's own message classes."""

from __future__ import annotations

import struct

import pytest
from pyroute2.netlink import NLM_F_REQUEST, NLMSG_ERROR
from pyroute2.netlink.diag import SOCK_DIAG_BY_FAMILY, SS_ALL, inet_diag_msg, inet_diag_req

from imds_agent.identity.sockets import INET_DIAG_NOCOOKIE, SocketOwner, _words, decode_reply, encode_request


@pytest.mark.parametrize(
    ("src", "dst"),
    [(("10.0.0.5", 41000), ("169.254.169.254", 80)), (("fd00:ec2::1", 50123), ("fd00:ec2::254", 80))],
)
def test_request_matches_pyroute2_encoding(src: tuple[str, int], dst: tuple[str, int]) -> None:
    ours = encode_request(7, src, dst)
    req = inet_diag_req()
    req["header"]["type"] = SOCK_DIAG_BY_FAMILY
    req["header"]["flags"] = NLM_F_REQUEST
    req["header"]["sequence_number"] = 7
    req["sdiag_family"] = 10 if ":" in src[0] else 2
    req["sdiag_protocol"] = 6
    req["idiag_states"] = SS_ALL
    req["idiag_sport"], req["idiag_dport"] = src[1], dst[1]
    req["idiag_src"], req["idiag_dst"] = _words(src[0]), _words(dst[0])
    req["idiag_cookie"] = INET_DIAG_NOCOOKIE
    req.encode()
    assert ours == bytes(req.data)
    assert len(ours) == 72


def test_reply_gives_uid_inode_and_cookie() -> None:
    msg = inet_diag_msg()
    msg["header"]["type"] = SOCK_DIAG_BY_FAMILY
    msg["idiag_family"] = 2
    msg["idiag_src"], msg["idiag_dst"] = (0x0A000005, 0, 0, 0), (0xA9FEA9FE, 0, 0, 0)
    msg["idiag_uid"], msg["idiag_inode"] = 1234, 987654
    msg["idiag_cookie"] = 0x1122334455667788
    msg.encode()
    assert decode_reply(bytes(msg.data)) == SocketOwner(uid=1234, inode=987654, cookie=0x1122334455667788)


def _error(code: int) -> bytes:
    return struct.pack("=IHHIIi", 36, NLMSG_ERROR, 0, 1, 0, -code) + b"\0" * 16


def test_enoent_means_no_such_socket_and_other_errors_raise() -> None:
    assert decode_reply(_error(2)) is None
    with pytest.raises(OSError, match="Operation not permitted"):
        decode_reply(_error(1))
