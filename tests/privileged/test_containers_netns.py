"""Containers with network namespaces of their own, on the nftables and iptables backends: namespaces behind a
bridge in the sandbox's host namespace, one routed hop from the metadata service, as containers are on an instance.

What the hop limit does to them without the agent, what the agent gives them, and how the container listener
refuses everyone the redirect did not send it from a local container (another host on the bridge's segment, a
container dialling the listener itself, a host process).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from collections.abc import Iterator

import pytest
from pyroute2 import IPRoute, netns

from imds_agent.sandbox.agentproc import AgentProcess
from imds_agent.sandbox.netns import BRIDGE_V4, Sandbox, wait_for

pytestmark = pytest.mark.privileged
NOBODY = 65534
BASE = "http://169.254.169.254/latest"
TTL = "X-aws-ec2-metadata-token-ttl-seconds: 60"
CONTAINERS = "containers: {enabled: true}\n"


@pytest.fixture
def sbx() -> Iterator[Sandbox]:
    with Sandbox() as sandbox:
        sandbox.add_container("web", "172.30.0.2")
        yield sandbox


def curl(sbx: Sandbox, ns: str, *args: str, uid: int = NOBODY, timeout: float = 3) -> tuple[int, str, str]:
    """(curl's exit code, HTTP status, body) for a request made in namespace ``ns``."""
    argv = ["curl", "-s", "-w", "\n%{http_code}", "--max-time", str(timeout), *args]
    proc = sbx.run(argv, uid=uid, ns=ns, timeout=timeout + 10)
    body, _, status = proc.stdout.rpartition("\n")
    return proc.returncode, status, body


def imdsv2(sbx: Sandbox, ns: str, path: str) -> tuple[int, str, str]:
    """A token PUT, then a GET with it, as an IMDSv2 client does."""
    code, status, token = curl(sbx, ns, "-X", "PUT", "-H", TTL, f"{BASE}/api/token")
    if status != "200":
        return code, status, token
    return curl(sbx, ns, "-H", f"X-aws-ec2-metadata-token: {token}", f"{BASE}/{path}")


def records(agent: AgentProcess) -> list[dict[str, object]]:
    with open(f"{agent.sbx.workdir}/audit/audit.jsonl", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def wait_records(agent: AgentProcess, count: int) -> list[dict[str, object]]:
    assert wait_for(lambda: len(records(agent)) >= count, 5), records(agent)
    return records(agent)


@pytest.mark.parametrize("backend", ["nftables", "iptables"])
def test_hop_limit_1_starves_a_container_without_the_agent_and_the_agent_serves_it(sbx: Sandbox, backend: str) -> None:
    # Without the agent: the token's answer leaves with TTL 1 and dies at the host's bridge; IMDSv1 is refused.
    started = time.monotonic()
    code, status, _ = curl(sbx, "web", "-X", "PUT", "-H", TTL, f"{BASE}/api/token", timeout=2)
    assert (code, status) == (28, "000"), "the token PUT should time out one routed hop away"
    assert time.monotonic() - started >= 1.9
    assert curl(sbx, "web", f"{BASE}/meta-data/instance-id")[1] == "401"
    assert sbx.emulator_control.counters()["token_puts"] == 1  # it did arrive: only the answer was lost

    agent = AgentProcess(sbx, mode="enforce", backend=backend, extra=CONTAINERS).start()
    try:
        code, status, body = curl(sbx, "web", f"{BASE}/meta-data/instance-id")
        assert (status, body) == ("200", "i-0e1a2b3c4d5e6f708"), (code, status, body, agent.log()[-2000:])
        assert imdsv2(sbx, "web", "meta-data/instance-id")[1:] == ("200", "i-0e1a2b3c4d5e6f708")
        # A container no rule names gets the default: non-sensitive metadata, never the role's credentials.
        code, status, body = curl(sbx, "web", f"{BASE}/meta-data/iam/security-credentials/")
        assert status == "403" and "uid=65534" in body
        assert curl(sbx, "host", f"{BASE}/meta-data/instance-id")[1] == "200"  # host clients as before
        got = wait_records(agent, 5)
        from_web = [r for r in got if r["path"] == "/latest/meta-data/instance-id" and r["imds"] == "v1"]
        assert from_web and from_web[0]["exe"] == "/usr/bin/curl" and from_web[0]["uid"] == NOBODY
        assert from_web[0]["identified"] is True and from_web[0]["decision"] == "allow"
    finally:
        agent.stop()


@pytest.mark.parametrize("backend", ["nftables", "iptables"])
def test_every_spelling_from_a_container_is_served_and_attributed(sbx: Sandbox, backend: str) -> None:
    # [::ffff:169.254.169.254] makes an AF_INET6 socket whose packets are IPv4: redirected by the IPv4 rule, and
    # the socket is in the container's tcp6 table. Before, that client was refused as "no local container".
    agent = AgentProcess(sbx, mode="enforce", backend=backend, extra=CONTAINERS).start()
    try:
        for url in (f"{BASE}/meta-data/instance-id", "http://[::ffff:169.254.169.254]/latest/meta-data/instance-id"):
            code, status, body = curl(sbx, "web", "-g", url)
            assert (status, body) == ("200", "i-0e1a2b3c4d5e6f708"), (url, code, body)
        got = wait_records(agent, 2)
        assert [(r["exe"], r["uid"], r["identified"]) for r in got[-2:]] == [("/usr/bin/curl", NOBODY, True)] * 2
    finally:
        agent.stop()


@pytest.mark.parametrize("backend", ["nftables", "iptables"])
def test_the_container_listener_serves_only_local_containers_the_redirect_sent(sbx: Sandbox, backend: str) -> None:
    # No reconciler, and a table no process owns: the test takes the kernel's own listener guard away below.
    agent = AgentProcess(sbx, mode="audit", backend=backend, extra=CONTAINERS, reconcile_interval=0,
                         fail_mode="closed").start()  # fmt: skip
    try:
        # Another host on the bridge's segment, routing 169.254.169.254 through this one: its socket lives in a
        # network stack no process of this host is in (here a namespace with no process, where the test opens
        # the socket and leaves), so no local container holds it. Refused in audit mode too, never forwarded.
        before = sbx.emulator_control.counters().get("requests", 0)
        other = sbx.add_container("other", "172.30.0.9")
        netns.pushns(other)
        try:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        finally:
            netns.popns()
        with sock:
            sock.settimeout(3)
            sock.connect(("169.254.169.254", 80))
            sock.sendall(b"GET /latest/meta-data/instance-id HTTP/1.1\r\nHost: 169.254.169.254\r\n\r\n")
            answer = sock.recv(4096).decode()
        assert answer.startswith("HTTP/1.1 403") and "no local container holds" in answer
        # A container dialling the listener itself (not the metadata service), and a host process doing so: the
        # kernel resets them (no redirect translated them) before the agent sees them.
        direct = f"http://{BRIDGE_V4}:969/latest/meta-data/instance-id"
        assert curl(sbx, "web", direct)[:2] == (7, "000")
        assert curl(sbx, "host", "http://127.0.0.1:969/latest/meta-data/instance-id")[:2] == (7, "000")
        # Without that rule the agent refuses them itself.
        if backend == "nftables":
            sbx.run(["nft", "flush", "chain", "inet", "imds_agent", "input_guard"], check=True)
        else:
            sbx.run(["iptables-legacy", "-F", "IMDS_AGENT_LSN"], check=True)
        code, status, body = curl(sbx, "web", direct)
        assert status == "403" and "not a redirected container connection" in body
        assert curl(sbx, "host", "http://127.0.0.1:969/latest/meta-data/instance-id")[1] == "403"
        assert sbx.emulator_control.counters().get("requests", 0) == before  # none of them went upstream
        refused = [r for r in wait_records(agent, 3) if r["decision"] == "refused"]
        assert len(refused) == 3 and all(r["identified"] is False for r in refused)
        assert {str(r["reason"]).split(" (")[0] for r in refused} == {
            "no local container holds this connection's socket",
            "not a redirected container connection",
        }
        # The container's own redirected request is still served, and judged as what enforce would do.
        assert curl(sbx, "web", f"{BASE}/meta-data/iam/security-credentials/")[1] == "200"
        last = wait_records(agent, 4)[-1]
        assert last["decision"] == "would-deny" and last["exe"] == "/usr/bin/curl"
    finally:
        agent.stop()


def test_switching_containers_off_leaves_no_container_rule(sbx: Sandbox) -> None:
    # The same table, or chains, without the container part: nothing keeps redirecting to a listener not there.
    agent = AgentProcess(sbx, backend="iptables", fail_mode="closed", extra=CONTAINERS).start()
    agent.stop()
    assert "IMDS_AGENT_IN" in sbx.run(["iptables-legacy-save"]).stdout  # kept while stopped: fail_mode closed
    agent = AgentProcess(sbx, backend="iptables", fail_mode="closed", extra="containers: {enabled: false}\n")
    agent.start()
    try:
        saved = sbx.run(["iptables-legacy-save"]).stdout
        assert "IMDS_AGENT -" in saved and "IMDS_AGENT_IN" not in saved and "IMDS_AGENT_FWD" not in saved
        assert curl(sbx, "web", f"{BASE}/meta-data/instance-id", timeout=2)[1] == "401"  # direct again, as before
    finally:
        agent.stop()


def test_report_names_the_network_namespaces_the_redirect_does_not_cover(sbx: Sandbox) -> None:
    # "web" is behind docker0 (covered). "side" has a veth into the host namespace under a name the interfaces
    # setting does not list; "lonely" has loopback only and reaches nothing.
    side = sbx.add_container("side", "172.30.0.7")
    with IPRoute(netns=sbx.host_ns) as ipr:
        idx = ipr.link_lookup(ifname="vc-side")[0]
        ipr.link("set", index=idx, master=0)
        ipr.link("set", index=idx, ifname="tap-side")
    lonely = f"{sbx.host_ns[: -len('host')]}lonely"
    netns.create(lonely)
    sbx._created.append(lonely)
    for ns in ("web", "side"):
        sbx.spawn(["sleep", "60"], ns=ns)
    sleeper = subprocess.Popen(["ip", "netns", "exec", lonely, "sleep", "60"])
    try:
        agent = AgentProcess(sbx, extra=CONTAINERS)
        assert wait_for(lambda: "tap-side" in agent.cli("report").stdout, 5)
        lines = [line for line in agent.cli("report").stdout.splitlines() if line.startswith("not covered")]
        ours = {line for line in lines if "enters on" in line}
        inode = os.stat(f"/run/netns/{side}").st_ino
        assert ours == {
            f"not covered by the redirect: netns {inode}, pid {_pid_in(side)} (sleep): enters on tap-side, "
            "which containers.interfaces does not name"
        }, lines
        lonely_ino = os.stat(f"/run/netns/{lonely}").st_ino
        web_ino = os.stat(f"/run/netns/{sbx.containers['web']}").st_ino
        assert not any(f"netns {lonely_ino}," in line or f"netns {web_ino}," in line for line in lines)
        off = AgentProcess(sbx, extra="containers: {enabled: false}\n")
        assert any(f"netns {web_ino}," in line and "containers.enabled is false" in line
                   for line in off.cli("report").stdout.splitlines())  # fmt: skip
    finally:
        sleeper.kill()
        sleeper.wait()


def _pid_in(ns: str) -> int:
    return min(
        int(p) for p in subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()
    )


LOOP = """
import http.client, sys
for _ in range(int(sys.argv[1])):
    c = http.client.HTTPConnection("169.254.169.254", 80, timeout=5)
    c.request("GET", "/latest/meta-data/instance-id"); c.getresponse().read(); c.close()
"""


def test_root_in_a_container_gets_a_containers_share_not_roots(sbx: Sandbox) -> None:
    # uid 0 inside a container is uid 0 on the host without user namespaces: it must not get host root's
    # exemptions. 600 requests against an audit budget of 500 lines: 100 are summarised, the summary names the
    # container's namespace, and host root's own lines are still written in full.
    agent = AgentProcess(sbx, backend="nftables", extra=CONTAINERS, audit=", rate_per_uid: 1, burst_per_uid: 500")
    agent.start()
    try:
        sbx.run(["python3", "-c", LOOP, "600"], ns="web", check=True, timeout=120)
        sbx.run(["python3", "-c", LOOP, "20"], ns="host", check=True, timeout=60)
        log = f"{sbx.workdir}/audit/audit.jsonl"

        def lines() -> list[dict[str, object]]:
            with open(log, encoding="utf-8") as fh:
                return [json.loads(line) for line in fh]

        assert wait_for(lambda: sum(1 for r in lines() if r.get("uid") == 0 and "summary" not in r) >= 520, 10)
        web = os.stat(f"/run/netns/{sbx.containers['web']}").st_ino
        agent.stop()  # writes the summaries still pending
        got = lines()
        written = sum(1 for r in got if r.get("uid") == 0 and "summary" not in r)
        summaries = [r for r in got if "summary" in r]
        suppressed = sum(int(str(r["suppressed"])) for r in summaries)
        # Every request is accounted for: written, or counted in a summary naming the container's namespace. Host
        # root's 20 are all written (root is exempt); the container's burst of 500 runs out.
        assert written + suppressed == 620 and suppressed >= 50, (written, suppressed)
        assert summaries and all(f"the container network namespace {web}" in str(r["summary"]) for r in summaries)
    finally:
        if agent.proc is not None and agent.proc.poll() is None:
            agent.stop()


SQUAT = """
import socket, subprocess, sys, time
victim, lo, hi = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
for cmd in (["ip", "link", "set", "lo", "up"], ["ip", "addr", "add", victim + "/32", "dev", "lo"],
            ["ip", "addr", "add", "169.254.169.254/32", "dev", "lo"]):
    subprocess.run(cmd, check=True)
ls = socket.socket(); ls.bind(("169.254.169.254", 80)); ls.listen(4096); keep = []
for p in range(lo, hi):
    try:
        c = socket.socket(); c.bind((victim, p)); c.connect(("169.254.169.254", 80)); keep += [c, ls.accept()[0]]
    except OSError:
        pass
print(len(keep) // 2, flush=True); time.sleep(120)
"""


def test_a_host_users_own_namespace_can_neither_block_nor_impersonate_a_container(sbx: Sandbox) -> None:
    # Any user can `unshare -Urn`, take a container's address there and hold sockets on every port of its range:
    # before, 10 of 10 of the container's requests were refused as ambiguous (and with the container's remembered
    # process gone, recorded as the squatter's process). Namespaces a user namespace of a user owns never count.
    sbx.run(["sysctl", "-q", "-w", "net.ipv4.ip_local_port_range=40000 40999"], ns="web", check=True)
    agent = AgentProcess(sbx, mode="enforce", backend="nftables", extra=CONTAINERS).start()
    squatter = sbx.spawn(["unshare", "-Urn", "python3", "-c", SQUAT, "172.30.0.2", "40000", "41000"], uid=1000,
                         stdout=subprocess.PIPE)  # fmt: skip
    try:
        assert squatter.stdout is not None and int(squatter.stdout.readline()) > 900
        got = [curl(sbx, "web", f"{BASE}/meta-data/instance-id")[1] for _ in range(10)]
        assert got == ["200"] * 10, agent.log()[-2000:]
        mine = [r for r in records(agent) if r.get("path") == "/latest/meta-data/instance-id"]
        web = os.stat(f"/run/netns/{sbx.containers['web']}").st_ino
        assert len(mine) == 10 and all(r["netns"] == web and r["exe"] == "/usr/bin/curl" for r in mine)
    finally:
        squatter.kill()
        agent.stop()
