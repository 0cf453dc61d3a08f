"""What exactly reaches the metadata service: a raw recording server behind the real upstream client."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest

from imds_agent.config import UpstreamConfig
from imds_agent.errors import UpstreamError
from imds_agent.imds.upstream import Upstream


class Recorder:
    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.heads: list[str] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                buf = b""
                while True:
                    data = conn.recv(65536)
                    if not data:
                        break
                    buf += data
                    while b"\r\n\r\n" in buf:
                        head, buf = buf.split(b"\r\n\r\n", 1)
                        self.heads.append(head.decode())
                        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")


@pytest.fixture
def recorder() -> Iterator[Recorder]:
    rec = Recorder()
    yield rec
    rec.sock.close()


def names(head: str) -> dict[str, str]:
    return {line.split(":", 1)[0].lower(): line.split(":", 1)[1].strip() for line in head.split("\r\n")[1:]}


def test_a_request_without_host_gets_the_upstream_address_and_nothing_else(recorder: Recorder) -> None:
    up = Upstream(UpstreamConfig(ipv4="127.0.0.1", port=recorder.port))
    up.request("PUT", "/latest/api/token", [("X-aws-ec2-metadata-token-ttl-seconds", "21600")])
    sent = names(recorder.heads[-1])
    # Content-Length: 0 is what http.client sends for a PUT without a body, as every HTTP client does.
    assert sent == {"host": f"127.0.0.1:{recorder.port}", "x-aws-ec2-metadata-token-ttl-seconds": "21600",
                    "content-length": "0"}  # fmt: skip
    up.close()


def test_client_headers_pass_as_sent_and_duplicates_join(recorder: Recorder) -> None:
    up = Upstream(UpstreamConfig(ipv4="127.0.0.1", port=recorder.port))
    up.request("GET", "/latest/meta-data/", [("Host", "169.254.169.254"), ("User-Agent", "aws-sdk-go/1.44"),
                                             ("X-Custom", "a"), ("x-custom", "b")])  # fmt: skip
    sent = names(recorder.heads[-1])
    assert sent["host"] == "169.254.169.254" and sent["user-agent"] == "aws-sdk-go/1.44"
    assert sent["x-custom"] == "a, b"
    assert not {"x-forwarded-for", "forwarded", "via", "accept-encoding"} & set(sent)
    assert Upstream(UpstreamConfig(ipv4="169.254.169.254")).host_header == "169.254.169.254"
    assert Upstream(UpstreamConfig(), host="fd00:ec2::254").host_header == "[fd00:ec2::254]"
    up.close()


def test_via_ipv6_uses_the_ipv6_address() -> None:
    from imds_agent.config import UpstreamConfig as UC

    assert Upstream(UC(via="ipv6")).netloc == "[fd00:ec2::254]:80"
    assert Upstream(UC()).netloc == "169.254.169.254:80"


class Scripted:
    """A server that answers each request on a connection with the next canned reply; counts connections."""

    def __init__(self, replies: list[bytes], close_after: bool = False) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.replies = replies
        self.close_after = close_after
        self.connections = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            with conn:
                buf = b""
                while self.replies:
                    data = conn.recv(65536)
                    if not data:
                        break
                    buf += data
                    if b"\r\n\r\n" in buf:
                        buf = buf.split(b"\r\n\r\n", 1)[1]
                        conn.sendall(self.replies.pop(0))
                        if self.close_after:
                            break


def upstream_for(server: Scripted) -> Upstream:
    return Upstream(UpstreamConfig(ipv4="127.0.0.1", port=server.port, connect_timeout=0.5, read_timeout=0.5))


def test_keep_alive_is_reused_and_connection_close_is_honoured() -> None:
    ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    closing = b"HTTP/1.1 404 Not Found\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
    server = Scripted([ok, ok, closing, ok])
    up = upstream_for(server)
    assert [up.request("GET", "/", []).status for _ in range(3)] == [200, 200, 404]
    assert server.connections == 1
    assert up.request("GET", "/", []).body == b"ok"  # the 404 said close: a new connection for this one
    assert server.connections == 2
    up.close()


def test_chunked_bodies_bodies_to_the_close_and_head_answers_are_read_whole() -> None:
    chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n"
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\n"
    server = Scripted([chunked, head])
    up = upstream_for(server)
    assert up.request("GET", "/", []).body == b"abcde"
    assert up.request("HEAD", "/", []).body == b""
    up.close()
    to_close = Scripted([b"HTTP/1.0 200 OK\r\n\r\nuntil the end"], close_after=True)
    assert upstream_for(to_close).request("GET", "/", []).body == b"until the end"


def test_a_pooled_connection_closed_while_idle_is_retried_once_on_a_new_one() -> None:
    ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    server = Scripted([ok, ok], close_after=True)  # closes every connection after one answer, without saying so
    up = upstream_for(server)
    assert up.request("GET", "/", []).status == 200
    time.sleep(0.05)
    assert up.request("GET", "/", []).status == 200  # the pooled one was dead: retried, not a 502
    assert server.connections == 2
    up.close()


@pytest.mark.parametrize(
    ("reply", "cause"),
    [(b"SPDY/3 200 OK\r\n\r\n", "malformed status line"), (b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
      "invalid Content-Length"), (b"HTTP/1.1 200 OK\r\nBad Header\r\n\r\n", "malformed header")],
)  # fmt: skip
def test_a_malformed_answer_is_502_naming_it(reply: bytes, cause: str) -> None:
    up = upstream_for(Scripted([reply]))
    with pytest.raises(UpstreamError) as info:
        up.request("GET", "/", [])
    assert info.value.status == 502 and cause in str(info.value)


def test_silence_is_504_and_refusal_is_502() -> None:
    silent = socket.socket()  # the kernel accepts for it; nothing ever answers
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    port = silent.getsockname()[1]
    with pytest.raises(UpstreamError) as info:
        Upstream(UpstreamConfig(ipv4="127.0.0.1", port=port, read_timeout=0.5)).request("GET", "/", [])
    assert info.value.status == 504 and "did not answer within 0.5s" in str(info.value)
    silent.close()
    with pytest.raises(UpstreamError) as info:
        Upstream(UpstreamConfig(ipv4="127.0.0.1", port=port)).request("GET", "/", [])
    assert info.value.status == 502 and "unreachable: Connection refused" in str(info.value)
