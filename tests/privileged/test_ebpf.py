"""The ebpf backend against the kernel: each test has its own cgroup (never the host's root or an existing one)
and its own network namespace; only the test's client processes are moved into that cgroup."""

from __future__ import annotations

import json
import os
import select
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from typing import Any, Optional

import pytest
from pyroute2 import IPRoute, netns

from imds_agent.errors import RedirectError
from imds_agent.redirect import bpfsys
from imds_agent.redirect.base import RedirectSpec, State
from imds_agent.redirect.ebpf import ATTACH, IPPROTO_MPTCP, EbpfBackend, default_cgroup, peer_cookie

from .conftest import NOBODY, run, setup_metadata_link
from .redirect_checks import PATH_ENV, Listeners, listeners

pytestmark = pytest.mark.privileged
AGENT_UID = 4242
# Runs as root: join the cgroup named by argv[1] (if any), then exec the rest of argv.
JOIN = """import os, sys
if sys.argv[1]:
    open(sys.argv[1], "w").write(str(os.getpid()))
os.execv(sys.argv[2], sys.argv[2:])
"""
CLIENT = """import json, os, socket, sys
family = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
s = socket.socket(family, socket.SOCK_STREAM, int(sys.argv[2]) if len(sys.argv) > 2 else 0)
try:
    s.settimeout(3)
    s.connect((sys.argv[1], 80))
except OSError as exc:
    print(json.dumps({"error": type(exc).__name__}), flush=True)
    sys.exit(0)
cookie = int.from_bytes(s.getsockopt(socket.SOL_SOCKET, 57, 8), sys.byteorder)
s.sendall(b"x")
s.recv(1)
print(json.dumps({"pid": os.getpid(), "cookie": cookie}), flush=True)
"""


@pytest.fixture
def cgroup() -> Iterator[str]:
    """A fresh cgroup under the v2 hierarchy, removed afterwards (its processes have exited by then)."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    root = default_cgroup()
    if root is None:
        pytest.skip("no cgroup v2 hierarchy")
    path = os.path.join(root, f"imds-agent-test-{uuid.uuid4().hex[:10]}")
    os.mkdir(path)
    try:
        yield path
    finally:
        for _ in range(50):
            try:
                os.rmdir(path)
                break
            except OSError:
                time.sleep(0.02)


@pytest.fixture
def backend(cgroup: str, netns_name: str) -> Iterator[EbpfBackend]:
    b = EbpfBackend(cgroup=cgroup)
    try:
        assert b.is_supported(), f"ebpf backend unsupported here:\n{b.unsupported_reason()}"
        yield b
    finally:
        b.close()


class Client:
    """One client process connecting to ``address``:80 as ``uid``, inside ``cgroup`` (or where pytest runs)."""

    def __init__(self, uid: int, address: str, cgroup: Optional[str], netns: str = "", proto: int = 0) -> None:
        procs = os.path.join(cgroup, "cgroup.procs") if cgroup else ""
        enter = ["/usr/sbin/ip", "netns", "exec", netns] if netns else []
        argv = ["/usr/bin/python3", "-c", JOIN, procs, *(enter or ["/usr/bin/env"]), "/usr/bin/setpriv",
                f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "/usr/bin/python3", "-c", CLIENT, address,
                str(proto)]  # fmt: skip
        self.proc = subprocess.Popen(argv, env=PATH_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def result(self) -> dict[str, Any]:
        out, err = self.proc.communicate(timeout=10)
        assert self.proc.returncode == 0, err
        return dict(json.loads(out))


def serve(ls: Listeners, client: Client, backend: EbpfBackend) -> tuple[str, dict[str, Any], Any]:
    """Accept the client's connection: where it landed, what the client said, and the record (agent side only)."""
    ready, _, _ = select.select(ls.agent + ls.real, [], [], 5)
    if not ready:
        client.proc.kill()
        raise AssertionError(f"no connection arrived: {client.proc.communicate()}")
    conn, _ = ready[0].accept()
    with conn:
        conn.recv(1)
        record = None
        where = "agent" if ready[0] in ls.agent else "real"
        if where == "agent":
            cookie = peer_cookie(conn)
            assert cookie is not None
            record = (cookie, backend.record(cookie))
        conn.sendall(b"y")
    return where, client.result(), record


def spec(port: int) -> RedirectSpec:
    return RedirectSpec(exempt_uid=AGENT_UID, listen_port=port)


@pytest.mark.parametrize("address", ["169.254.169.254", "fd00:ec2::254", "::ffff:169.254.169.254"])
def test_another_uid_in_the_cgroup_reaches_the_agent_and_is_recorded_by_cookie(
    backend: EbpfBackend, cgroup: str, address: str
) -> None:
    with listeners() as ls:
        backend.apply(spec(ls.port), owned=True)
        where, said, (cookie, record) = serve(ls, Client(NOBODY, address, cgroup), backend)
    assert where == "agent"
    assert cookie == said["cookie"], "sock_diag's cookie of the peer is the client's SO_COOKIE"
    assert record is not None, "no record under the peer's cookie"
    assert (record.tgid, record.tid, record.uid, record.gid) == (said["pid"], said["pid"], NOBODY, NOBODY)
    assert record.comm == "python3"
    assert record.cgroup_id == os.stat(cgroup).st_ino
    assert record.original_dst == (address, 80)


@pytest.mark.parametrize("address", ["169.254.169.254", "fd00:ec2::254", "::ffff:169.254.169.254"])
def test_the_agents_uid_and_processes_outside_the_cgroup_go_to_the_real_service(
    backend: EbpfBackend, cgroup: str, address: str
) -> None:
    with listeners() as ls:
        backend.apply(spec(ls.port), owned=True)
        assert serve(ls, Client(AGENT_UID, address, cgroup), backend)[0] == "real"
        assert serve(ls, Client(NOBODY, address, None), backend)[0] == "real"
        assert serve(ls, Client(NOBODY, address, cgroup), backend)[0] == "agent", "the hooks were on meanwhile"


def test_mptcp_connects_are_redirected_and_recorded_under_the_subflows_cookie(
    backend: EbpfBackend, cgroup: str
) -> None:
    with listeners() as ls:
        backend.apply(spec(ls.port), owned=True)
        where, said, (_, record) = serve(ls, Client(NOBODY, "169.254.169.254", cgroup, proto=IPPROTO_MPTCP), backend)
    assert where == "agent"
    assert record is not None and record.tgid == said["pid"], "the accepted peer is the MPTCP subflow"


def test_a_process_of_the_cgroup_in_another_network_namespace_is_left_alone(backend: EbpfBackend, cgroup: str) -> None:
    """The cgroup hook sees every namespace; the program only rewrites in the agent's, where it listens."""
    other = f"imdst-{uuid.uuid4().hex[:10]}"
    netns.create(other)
    try:
        with listeners() as ls:
            backend.apply(spec(ls.port), owned=True)
            netns.pushns(other)
            try:
                with IPRoute() as ipr:
                    setup_metadata_link(ipr)
                theirs = Listeners()
                theirs.port = ls.port
                theirs.open()
            finally:
                netns.popns()
            try:
                assert serve(theirs, Client(NOBODY, "169.254.169.254", cgroup, netns=other), backend)[0] == "real"
            finally:
                theirs.close()
    finally:
        netns.remove(other)


def test_a_prohibit_route_does_not_stop_the_rewritten_connect(backend: EbpfBackend, cgroup: str) -> None:
    run(["ip", "addr", "del", "169.254.169.254/32", "dev", "lo"])
    run(["ip", "-6", "addr", "del", "fd00:ec2::254/128", "dev", "lo"])
    run(["ip", "route", "add", "prohibit", "169.254.169.254"])
    run(["ip", "-6", "route", "add", "prohibit", "fd00:ec2::254"])
    with listeners_on_loopback() as ls:
        backend.apply(spec(ls.port), owned=True)
        for address in ("169.254.169.254", "fd00:ec2::254"):
            assert Client(NOBODY, address, None).result() == {"error": "PermissionError"}
            assert serve(ls, Client(NOBODY, address, cgroup), backend)[0] == "agent"


def test_check_names_the_links_and_close_leaves_nothing_attached(backend: EbpfBackend, cgroup: str) -> None:
    assert backend.check().state == State.ABSENT
    with listeners() as ls:
        backend.apply(spec(ls.port), owned=True)
        result = backend.check(spec(ls.port))
        assert result.state == State.PRESENT, result.details
        assert [v.family for v in result.rules] == ["ipv4", "ipv6"]
        assert all("link " in v.text and "prog " in v.text for v in result.rules)
        assert backend.check(spec(ls.port + 1)).state == State.PARTIAL
        backend.apply(spec(ls.port), owned=True)  # a re-apply replaces, never doubles
        assert attached(cgroup) == {"ipv4": 1, "ipv6": 1}
        backend.close()
        assert attached(cgroup) == {"ipv4": 0, "ipv6": 0}
        assert backend.check().state == State.ABSENT
        assert serve(ls, Client(NOBODY, "169.254.169.254", cgroup), backend)[0] == "real"


def test_persistent_programs_are_refused_until_pinning_exists(backend: EbpfBackend) -> None:
    with pytest.raises(RedirectError, match="pinning"):
        backend.apply(spec(968), owned=False)


def attached(cgroup: str) -> dict[str, int]:
    fd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
    try:
        return {family: len(bpfsys.query_cgroup(fd, kind)) for family, kind in ATTACH.items()}
    finally:
        os.close(fd)


class _LoopbackOnly(Listeners):
    def open(self) -> None:
        for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
            s = socket.socket(family)
            s.bind((host, self.port))
            s.listen(16)
            self.port = s.getsockname()[1]
            self.agent.append(s)


class listeners_on_loopback:
    """The agent's listeners only (the metadata addresses are gone from this namespace)."""

    def __enter__(self) -> Listeners:
        self.ls = _LoopbackOnly()
        self.ls.open()
        return self.ls

    def __exit__(self, *exc: object) -> None:
        self.ls.close()


def test_a_missing_cgroup_is_a_redirect_error_naming_it(netns_name: str) -> None:
    b = EbpfBackend(cgroup="/sys/fs/cgroup/imds-agent-no-such-cgroup")
    try:
        with pytest.raises(RedirectError, match="cannot open cgroup /sys/fs/cgroup/imds-agent-no-such-cgroup"):
            b.apply(spec(968), owned=True)
        assert b.check().state == State.ABSENT
    finally:
        b.close()
