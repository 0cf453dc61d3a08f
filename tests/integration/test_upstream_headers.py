"""What exactly reaches the metadata service: a raw recording server behind the real upstream client."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import pytest

from imds_agent.config import UpstreamConfig
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
