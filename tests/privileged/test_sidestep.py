"""Connections that go round the redirect: NAT rules see only a connection's first packet.

Each test runs in a fresh namespace (see conftest) where 169.254.169.254 and fd00:ec2::254 sit on lo, so that the
"real" metadata service is a listener in the namespace (redirect_checks.listeners) and nothing leaves it.

- A connection opened to the metadata service before the rules exist (fail_mode open: the agent was down or
  restarting) is established in conntrack, so the redirect never sees it. The guard resets it on its next packet;
  the client's retry is redirected; the agent's own uid still goes direct.
- A client squatting the source port of one of the agent's own connections, so that its SYN would match the
  agent's conntrack entry: the experiment records what the kernel allows, and asserts that whatever gets through
  is redirected or reset, never answered by the metadata service.
"""

from __future__ import annotations

import select
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from typing import Union

import pytest

from imds_agent.redirect.base import RedirectSpec, RuleView
from imds_agent.redirect.iptables import IptablesBackend
from imds_agent.redirect.nftables import NftablesBackend

from .redirect_checks import PATH_ENV, HeldClient, Listeners, accept, listeners, received, run

pytestmark = pytest.mark.privileged
NOBODY = 65534
AGENT_UID = 64001
ADDRESSES = {"ipv4": "169.254.169.254", "ipv6": "fd00:ec2::254"}
AnyBackend = Union[NftablesBackend, IptablesBackend]


@pytest.fixture(params=["nftables", "iptables"])
def backend(request: pytest.FixtureRequest, netns_name: str) -> Iterator[AnyBackend]:
    made: AnyBackend = NftablesBackend() if request.param == "nftables" else IptablesBackend()
    try:
        yield made
    finally:
        try:
            made.remove()
        finally:
            made.close()


def track_connections() -> None:
    """A host firewall with a stateful rule, as most hosts have (Docker, firewalld, ufw): conntrack then follows
    every connection, including those opened while the agent's rules are absent. (In a namespace where nothing
    uses conntrack, a connection it first sees mid-stream is NATed like a new one, and the redirect resets it.)"""
    run(["nft", "add", "table", "inet", "host_fw"])
    run(["nft", "add", "chain", "inet", "host_fw", "out", "{ type filter hook output priority 10; }"])
    run(["nft", "add", "rule", "inet", "host_fw", "out", "ct", "state", "established", "counter", "accept"])


def guard_views(backend: AnyBackend, spec: RedirectSpec, family: str) -> list[RuleView]:
    """The guard's rules for ``family`` as check() reports them (nft: reject; iptables: the filter table's)."""
    rules = backend.check(spec).rules
    return [r for r in rules if r.family == family and ("reject with tcp reset" in r.text or "-j REJECT" in r.text)]


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_a_connection_opened_before_the_rules_is_reset_and_its_retry_redirected(
    backend: AnyBackend, family: str
) -> None:
    address, index = ADDRESSES[family], 0 if family == "ipv4" else 1
    with listeners() as ls:
        spec = RedirectSpec(exempt_uid=AGENT_UID, listen_port=ls.port)
        track_connections()
        backend.apply(spec)
        backend.remove()  # the agent restarts with fail_mode open: its rules are gone meanwhile
        stale = HeldClient(NOBODY, address)
        agent = HeldClient(AGENT_UID, address)
        try:
            stale_conn, agent_conn = accept(ls.real[index]), accept(ls.real[index])
            backend.apply(spec)

            outcome = stale.use()
            assert received(stale_conn) == b"", "the stale connection reached the metadata service"
            assert outcome == "error ConnectionResetError"  # fails fast, so that the client retries
            assert ls.connect_as(NOBODY, address) == ("agent", (address, 80))  # and the retry is redirected

            # The agent's own connection, older than the rules, still works.
            result: dict[str, str] = {}
            user = threading.Thread(target=lambda: result.update(out=agent.use()))
            user.start()
            agent_conn.settimeout(3)
            with agent_conn:
                assert agent_conn.recv(1) == b"x"
                agent_conn.sendall(b"y")
                user.join(5)
            assert result["out"] == "got 79"
            assert ls.connect_as(AGENT_UID, address)[0] == "real"  # and so does a new one

            (view,) = guard_views(backend, spec, family)
            assert view.packets is not None and view.packets >= 1  # the reset is counted
        finally:
            stale.close()
            agent.close()
            stale_conn.close()


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_the_agent_s_own_connections_close_cleanly_under_the_guard(backend: AnyBackend, family: str) -> None:
    """The agent closes first (its socket is orphaned, then in TIME_WAIT): the last ACK must not be reset, or the
    metadata service would be left in LAST_ACK."""
    address, index = ADDRESSES[family], 0 if family == "ipv4" else 1
    with listeners() as ls:
        backend.apply(RedirectSpec(exempt_uid=AGENT_UID, listen_port=ls.port))
        client = HeldClient(AGENT_UID, address)
        conn = accept(ls.real[index])
        try:
            client.proc.kill()  # closes the agent's socket: FIN from the agent
            client.proc.wait(5)
            assert received(conn, 3) == b""  # the FIN arrived
            conn.close()  # the service's FIN; the agent's orphaned socket acknowledges it
            deadline = time.monotonic() + 3
            while "LAST-ACK" in run(["ss", "-tan"]):
                assert time.monotonic() < deadline, run(["ss", "-tan"])
                time.sleep(0.1)
        finally:
            client.close()
            conn.close()


SQUAT = """import errno, socket, sys
family = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
s = socket.socket(family)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
try:
    s.bind((sys.argv[1], int(sys.argv[2])))
except OSError as exc:
    print("bind", errno.errorcode[exc.errno], flush=True)
    sys.exit()
s.settimeout(3)
try:
    s.connect((sys.argv[1], 80))
except OSError as exc:
    print("connect", errno.errorcode.get(exc.errno, str(exc)), flush=True)
    sys.exit()
print("connected", flush=True)
try:
    s.sendall(b"x")
    print("got", s.recv(1).hex() or "eof", flush=True)
except OSError as exc:
    print("error", type(exc).__name__, flush=True)
"""

AGENT_SIDE = """import socket, sys
family = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
s = socket.socket(family)
if sys.argv[2] == "reuse":
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.connect((sys.argv[1], 80))
print(s.getsockname()[1], flush=True)
if sys.argv[3] == "close":
    s.close()
    print("closed", flush=True)
sys.stdin.readline()
"""


def as_uid(uid: int, code: str, *args: str) -> subprocess.Popen[str]:
    argv = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "/usr/bin/python3", "-c", code, *args]
    return subprocess.Popen(
        argv, env=PATH_ENV, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def squat(ls: Listeners, address: str, index: int, agent_reuse: bool, agent_closes: bool) -> str:
    """The agent's uid holds (or has just closed) a connection to the service; nobody binds its source address
    and port with SO_REUSEADDR and connects. Returns what nobody saw; asserts that the service got nothing from
    nobody, on a connection of its own or on the agent's."""
    agent = as_uid(AGENT_UID, AGENT_SIDE, address, "reuse" if agent_reuse else "plain",
                   "close" if agent_closes else "hold")  # fmt: skip
    conns: list[socket.socket] = []
    try:
        assert agent.stdout is not None
        port = agent.stdout.readline().strip()
        conns.append(accept(ls.real[index]))
        if agent_closes:
            assert agent.stdout.readline().strip() == "closed"
            conns[0].close()  # both sides closed: the agent's socket and its conntrack entry are in TIME_WAIT
            time.sleep(0.2)
        out, err = as_uid(NOBODY, SQUAT, address, port).communicate(timeout=15)
        if select.select([ls.real[index]], [], [], 0.5)[0]:
            conns.append(ls.real[index].accept()[0])
            assert received(conns[-1]) == b"", f"nobody reached the service from the agent's port {port}"
        if not agent_closes:
            assert received(conns[0], 0.5) == b"", "nobody's data arrived on the agent's connection"
        outcome = (out.strip() or err.strip()).replace("\n", ", ")
        while select.select([ls.agent[index]], [], [], 0.2)[0]:
            ls.agent[index].accept()[0].close()
            outcome += " (redirected to the agent)"
        return outcome
    finally:
        agent.kill()
        agent.wait(5)
        for conn in conns:
            conn.close()


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_squatting_the_agent_s_source_port_never_reaches_the_service(backend: AnyBackend, family: str) -> None:
    """What the kernel allows is printed (-s shows it): with the agent's socket held, bind fails (EADDRINUSE) or,
    when the agent's socket has SO_REUSEADDR too, connect does (EADDRNOTAVAIL: the 4-tuple is taken). Once the
    agent's connection is in TIME_WAIT and its socket had SO_REUSEADDR, connect succeeds, but conntrack treats the
    SYN as a new connection, so the redirect takes it."""
    address, index = ADDRESSES[family], 0 if family == "ipv4" else 1
    seen: dict[str, str] = {}
    with listeners() as ls:
        track_connections()
        backend.apply(RedirectSpec(exempt_uid=AGENT_UID, listen_port=ls.port))
        for name, reuse, closes in (("held", False, False), ("held-reuseaddr", True, False),
                                    ("time-wait", False, True), ("time-wait-reuseaddr", True, True)):  # fmt: skip
            seen[name] = squat(ls, address, index, reuse, closes)
    print(f"\nsquat {backend.name} {family}: {seen}")
    for outcome in seen.values():
        assert outcome.startswith(("bind ", "connect ")) or "redirected to the agent" in outcome or "Reset" in outcome
