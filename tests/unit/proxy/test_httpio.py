from __future__ import annotations

import socket
import threading

import pytest

from imds_agent.proxy.httpio import HttpError, RequestReader, parse_head, render_response


def test_parse_simple_request() -> None:
    req = parse_head(b"GET /latest/meta-data/ HTTP/1.1\r\nHost: 169.254.169.254\r\nX-Aws-Ec2-Metadata-Token:abc")
    assert req.method == "GET" and req.target == "/latest/meta-data/" and req.version == (1, 1)
    assert req.get("x-aws-ec2-metadata-token") == "abc"
    assert req.get("HOST") == "169.254.169.254"
    assert req.keep_alive


def test_header_value_space_is_optional_and_trimmed() -> None:
    a = parse_head(b"GET / HTTP/1.1\r\nX-aws-ec2-metadata-token:  tok  ")
    b = parse_head(b"GET / HTTP/1.1\r\nx-aws-ec2-metadata-token:tok")
    assert a.get("X-AWS-EC2-METADATA-TOKEN") == b.get("X-aws-ec2-metadata-token") == "tok"


def test_keep_alive_rules() -> None:
    assert not parse_head(b"GET / HTTP/1.0").keep_alive
    assert parse_head(b"GET / HTTP/1.0\r\nConnection: keep-alive").keep_alive
    assert not parse_head(b"GET / HTTP/1.1\r\nConnection: close").keep_alive


@pytest.mark.parametrize(
    ("head", "status"),
    [
        (b"GET /", 400),
        (b"GET  / HTTP/1.1", 400),
        (b"G(T / HTTP/1.1", 400),
        (b"GET / HTTP/2.0", 505),
        (b"GET / HTTX/1.1", 400),
        (b"GET /a\x01b HTTP/1.1", 400),
        (b"GET / HTTP/1.1\r\n folded", 400),
        (b"GET / HTTP/1.1\r\nHost : x", 400),
        (b"GET / HTTP/1.1\r\nNoColon", 400),
        (b"GET / HTTP/1.1\r\nX: a\x00b", 400),
        (b"GET / HTTP/1.1" + b"\r\nX: y" * 101, 431),
    ],
)
def test_malformed_heads(head: bytes, status: int) -> None:
    with pytest.raises(HttpError) as info:
        parse_head(head)
    assert info.value.status == status


def pair() -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair()
    return a, b


def test_reader_handles_pipelined_requests_and_eof() -> None:
    server, client = pair()
    client.sendall(b"GET /a HTTP/1.1\r\n\r\nGET /b HTTP/1.1\r\nHost: x\r\n\r\n")
    client.shutdown(socket.SHUT_WR)
    reader = RequestReader(server, idle_timeout=1, request_timeout=1)
    first, second = reader.read(), reader.read()
    assert first is not None and first.target == "/a"
    assert second is not None and second.target == "/b"
    assert reader.read() is None


def test_reader_oversized_head_is_431() -> None:
    server, client = pair()
    sender = threading.Thread(target=lambda: client.sendall(b"GET / HTTP/1.1\r\n" + b"X-Pad: " + b"a" * 20000))
    sender.start()
    with pytest.raises(HttpError) as info:
        RequestReader(server, idle_timeout=1, request_timeout=2).read()
    assert info.value.status == 431
    sender.join()


def test_reader_slow_client_is_408() -> None:
    server, client = pair()
    client.sendall(b"GET / HTTP/1.1\r\n")
    with pytest.raises(HttpError) as info:
        RequestReader(server, idle_timeout=1, request_timeout=0.2).read()
    assert info.value.status == 408


def test_reader_idle_connection_ends_quietly() -> None:
    server, _client = pair()
    assert RequestReader(server, idle_timeout=0.1, request_timeout=1).read() is None


def test_render_sets_length_and_close() -> None:
    data = render_response(200, "OK", [("Content-Type", "text/plain")], b"abc", close=True)
    head, body = data.split(b"\r\n\r\n")
    assert b"Content-Length: 3" in head and b"Connection: close" in head and body == b"abc"
    head_only = render_response(200, "OK", [], b"abc", head_only=True, content_length=3)
    assert head_only.endswith(b"\r\n\r\n") and b"Content-Length: 3" in head_only
