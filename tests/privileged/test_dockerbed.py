"""The Docker and containerd test bed itself: containers on the default bridge, on a user-defined network and under
ctr reach servers in their namespaces, their state files are where the agent will look, and a bed leaves the host
as it found it, even after a run that was killed."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from imds_agent.sandbox.netns import Sandbox, wait_for

from . import dockerbed
from .dockerbed import Docker, DockerUnavailable, docker_daemon
from .packages import REPO

# Cold, the first bed builds the client root with debootstrap (about a minute) and the image archive; warm, a test
# takes seconds.
pytestmark = [pytest.mark.privileged, pytest.mark.timeout(600)]
ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C"}
PORT = 8080
USER_SUBNET = "10.231.0.0/24"


def run(argv: list[str], check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, env=ENV, check=check, capture_output=True, text=True, timeout=timeout)


def make_netns(name: str) -> None:
    run(["ip", "netns", "add", name])
    run(["ip", "-n", name, "link", "set", "lo", "up"])


def delete_netns(name: str) -> None:
    for pid in run(["ip", "netns", "pids", name], check=False).stdout.split():
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass
    run(["ip", "netns", "del", name], check=False)


@pytest.fixture
def netns() -> Iterator[str]:
    """A plain network namespace with lo up, for the daemons; deleted afterwards with whatever still runs in it."""
    name = f"imdsdb-{uuid.uuid4().hex[:8]}"
    make_netns(name)
    try:
        yield name
    finally:
        delete_netns(name)


@contextmanager
def bed(netns: str, workdir: Path) -> Iterator[Docker]:
    """docker_daemon, skipping the test when this kernel cannot run dockerd."""
    try:
        with docker_daemon(netns, workdir) as docker:
            yield docker
    except DockerUnavailable as exc:
        pytest.skip(f"dockerd cannot run here: {exc}")


@contextmanager
def http_server(netns: str, address: str, directory: Path) -> Iterator[None]:
    """python3 -m http.server on ``address``:PORT in ``netns``, serving ``directory``, until the block ends."""
    argv = ["nsenter", f"--net=/run/netns/{netns}", "--", "/usr/bin/python3", "-u", "-m", "http.server",
            f"--bind={address}", f"--directory={directory}", str(PORT)]  # fmt: skip
    proc = subprocess.Popen(argv, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 10)
        assert ready and "Serving HTTP" in proc.stdout.readline(), proc.stderr.read() if proc.stderr else ""
        yield
    finally:
        proc.kill()
        proc.wait(5)
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


def page(directory: Path) -> str:
    """A page with a fresh token in ``directory``, so that an answer cannot come from anywhere else; the token."""
    directory.mkdir(exist_ok=True)
    token = uuid.uuid4().hex
    (directory / "token").write_text(token)
    return token


def netns_inode(pid: int) -> int:
    return os.stat(f"/proc/{pid}/ns/net").st_ino


def cgroup_lines(pid: int) -> list[str]:
    """The lines of /proc/PID/cgroup the agent takes a container's path from: the v2 one and name=systemd's."""
    lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    return [line for line in lines if line.startswith("0::") or "name=systemd" in line.split(":")[1]]


def curl(url: str) -> list[str]:
    return ["curl", "--silent", "--show-error", "--max-time", "10", url]


def test_containers_on_the_bridge_and_a_user_network_reach_the_namespace(netns: str, tmp_path: Path) -> None:
    www = tmp_path / "www"
    token = page(www)
    with bed(netns, tmp_path / "bed") as docker:
        image = docker.client_image()
        gateway = docker.gateway()
        assert gateway == "172.17.0.1"
        docker.network_create("users", USER_SUBNET)
        assert docker.gateway("users") == "10.231.0.1"
        with http_server(netns, gateway, www):
            on_bridge = docker.run(image, name="on-bridge", labels={"team": "a", "tier": "web"})
            on_users = docker.run(image, name="on-users", network="users", user="65534:65534")
            for box in (on_bridge, on_users):
                got = docker.exec(box.id, *curl(f"http://{gateway}:{PORT}/token"))
                assert got.stdout == token, docker.logs(box.id)
            assert docker.address(on_users.id, "users").startswith("10.231.0.")
            assert docker.exec(on_users.id, "id", "-u").stdout.strip() == "65534"
            # A waited-for run: its status and output.
            once = docker.run(image, "sh", "-c", f"curl -s http://{gateway}:{PORT}/token; exit 3", detach=False,
                              check=False)  # fmt: skip
            assert (once.returncode, once.stdout) == (3, token)

        # What the agent reads: Docker's state under the data root, the bundle, the cgroup layout, the pid.
        cid = on_bridge.id
        assert len(cid) == 64 and on_bridge.name == "on-bridge"
        config = json.loads(docker.config_path(cid).read_text())
        assert config["ID"] == cid and config["Name"] == "/on-bridge"
        assert config["Config"]["Image"] == dockerbed.CLIENT_IMAGE
        assert config["Config"]["Labels"] == {"team": "a", "tier": "web"}
        assert docker.config_path(cid) == docker.data_root / "containers" / cid / "config.v2.json"
        bundle = json.loads((docker.bundle_path(cid) / "config.json").read_text())
        assert bundle["linux"]["cgroupsPath"] == f"/docker/{cid}"
        pid = docker.pid(cid)
        assert pid > 1 and Path(f"/proc/{pid}/cgroup").exists()
        assert cgroup_lines(pid) and all(line.endswith(f":/docker/{cid}") for line in cgroup_lines(pid))
        assert netns_inode(pid) != os.stat(f"/run/netns/{netns}").st_ino  # a namespace of its own
        assert netns_inode(docker.containerd.pid) == os.stat(f"/run/netns/{netns}").st_ino

        # The image has the clients the agent is tested against.
        tools = docker.exec(cid, "sh", "-c", "aws --version; python3 -c 'import botocore; print(botocore.__name__)'")
        assert "aws-cli/" in tools.stdout and "botocore" in tools.stdout


def test_ctr_container_joins_the_callers_namespace_with_annotations(netns: str, tmp_path: Path) -> None:
    www = tmp_path / "www"
    token = page(www)
    with bed(netns, tmp_path / "bed") as docker:
        ctrd = docker.containerd
        image = ctrd.client_image()
        # Made after the daemons started: it still reaches their mount namespace (/run/netns is shared).
        pod = f"{netns}-pod"
        make_netns(pod)
        try:
            annotations = {"io.kubernetes.cri.sandbox-namespace": "prod", "io.kubernetes.cri.sandbox-name": "web-0"}
            with http_server(pod, "127.0.0.1", www):
                task = ctrd.run(image, "job", netns=pod, labels={"team": "b"}, annotations=annotations)
                got = ctrd.exec("job", *curl(f"http://127.0.0.1:{PORT}/token"))
                assert got.stdout == token
            assert netns_inode(task.pid) == os.stat(f"/run/netns/{pod}").st_ino
            assert (
                task.config_path == ctrd.state / "io.containerd.runtime.v2.task" / "imds-test" / "job" / "config.json"
            )
            spec = json.loads(task.config_path.read_text())
            assert annotations.items() <= spec["annotations"].items()
            assert spec["linux"]["cgroupsPath"] == "/imds-test/job"
            assert all(line.endswith(":/imds-test/job") for line in cgroup_lines(task.pid))
            assert ctrd.exec("job", "id", "-u", user="65534").stdout.strip() == "65534"

            ctrd.remove("job")
            assert not task.bundle.exists()
            assert wait_for(lambda: not dockerbed.alive(task.pid), 10)
        finally:
            delete_netns(pod)


def test_a_container_in_a_sandbox_is_a_routed_hop_from_the_metadata_service(tmp_path: Path) -> None:
    """Where the bed is used: in a sandbox's host namespace, without an agent. Docker's masquerade brings the
    container's requests to the emulator and the answers back; the token PUT's answer, sent with an IP TTL of 1
    (HttpPutResponseHopLimit), dies on the way, one routed hop short, as on an instance."""
    with Sandbox(tokens="optional") as sbx, bed(sbx.host_ns, tmp_path / "bed") as docker:
        url = "http://169.254.169.254/latest"
        got = docker.run(docker.client_image(), *curl(f"{url}/meta-data/instance-id"), detach=False)
        assert got.stdout.startswith("i-"), got
        put = ["curl", "--silent", "--max-time", "3", "--request", "PUT", "--header",
               "X-aws-ec2-metadata-token-ttl-seconds: 60", f"{url}/api/token"]  # fmt: skip
        token = docker.run(docker.client_image(), *put, detach=False, check=False)
        assert (token.returncode, token.stdout) == (28, ""), token  # 28: curl's timeout


def host_state(cgroups: bool = True) -> dict[str, str]:
    """What of the host a bed could change: the root namespace's rules, links, addresses, routes and forwarding
    sysctls, the paths Docker and containerd use by default, and (with ``cgroups``) the containers' cgroup parents,
    which exist while containers run."""
    state = {}
    for name, argv in (("iptables", ["iptables-save"]), ("ip6tables", ["ip6tables-save"]),
                       ("iptables-legacy", ["iptables-legacy-save"]), ("nft", ["nft", "list", "ruleset"]),
                       ("addr", ["ip", "-o", "addr"]), ("route", ["ip", "route", "show", "table", "all"])):  # fmt: skip
        proc = run(argv, check=False)
        state[name] = "\n".join(line for line in proc.stdout.splitlines() if not line.startswith("#"))  # no dates
    # A sandbox's veth pair passes through the root namespace while another test builds it: left out.
    links = run(["ip", "-o", "link"]).stdout.splitlines()
    state["links"] = "\n".join(sorted(line.split(":")[1].strip() for line in links if ": veth-" not in line))
    for key in ("ipv4/ip_forward", "ipv4/conf/all/forwarding", "ipv6/conf/all/forwarding",
                "bridge/bridge-nf-call-iptables", "ipv4/conf/all/route_localnet"):  # fmt: skip
        sysctl = Path("/proc/sys/net") / key
        state[key] = sysctl.read_text() if sysctl.exists() else "-"
    for path in ("/var/lib/docker", "/var/lib/containerd", "/run/docker", "/run/docker.sock", "/run/containerd",
                 "/opt/containerd", "/etc/docker/key.json", "/etc/containerd"):  # fmt: skip
        state[path] = "exists" if os.path.lexists(path) else "-"
    for root in dockerbed.cgroup_roots() if cgroups else []:
        for parent in ("docker", dockerbed.CTR_NAMESPACE):
            state[f"{root}/{parent}"] = "exists" if (root / parent).exists() else "-"
    return state


def mounted_under(workdir: Path) -> list[str]:
    """The host's mounts under ``workdir`` or made by a bed."""
    return [p for p, fs, _ in dockerbed.mounts() if p.startswith(str(workdir)) or "dockerbed" in p]


def test_a_bed_leaves_the_host_as_it_found_it(netns: str, tmp_path: Path) -> None:
    before = host_state()
    workdir = tmp_path / "bed"
    with bed(netns, workdir) as docker:
        image = docker.client_image()
        docker.network_create("users", USER_SUBNET)
        docker.run(image, name="one")
        docker.run(image, name="two", network="users")
        ctrd = docker.containerd
        ctrd.run(ctrd.client_image(), "job")
        # While it runs: Docker's rules are in its namespace, nothing is mounted in the host's, the default
        # paths stay unused.
        rules = run(["nsenter", f"--net=/run/netns/{netns}", "--", "iptables-save", "-t", "nat"]).stdout
        assert "-A POSTROUTING -s 172.17.0.0/16 ! -o docker0 -j MASQUERADE" in rules
        assert f"-A POSTROUTING -s {USER_SUBNET} ! -o br-" in rules
        assert mounted_under(workdir) == []
        during = host_state(cgroups=False)
        assert during == {k: before[k] for k in during}
        record = docker.record
        assert record.exists()
    assert host_state() == before
    assert not workdir.exists() and not record.exists()
    assert mounted_under(workdir) == []
    assert dockerbed._cmdline_pids(workdir) == []
    links = run(["ip", "-n", netns, "-o", "link"]).stdout
    assert "docker0" not in links and "br-" not in links and "veth" not in links


def test_a_killed_run_is_cleared_by_the_next_bed(netns: str, tmp_path: Path) -> None:
    old = tmp_path / "killed"
    argv = [sys.executable, "-m", "tests.privileged.dockerbed", "hold", netns, str(old)]
    holder = subprocess.Popen(argv, env=dict(ENV), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stderr is not None
        ready, _, _ = select.select([holder.stdout], [], [], 300)
        line = holder.stdout.readline() if ready else ""
        if not line:
            err = holder.stderr.read()
            if "DockerUnavailable" in err:
                pytest.skip(f"dockerd cannot run here: {err.strip().splitlines()[-1]}")
            raise AssertionError(f"the bed to be killed did not start:\n{err[-3000:]}")
        left = json.loads(line)
    finally:
        holder.kill()  # as a crash would: no teardown
        holder.wait(10)
        for stream in (holder.stdout, holder.stderr):
            if stream is not None:
                stream.close()
    survivors = (left["dockerd"], left["containerd"], left["container"])
    assert all(dockerbed.alive(pid) for pid in survivors)
    assert Path(left["record"]).exists()

    with bed(netns, tmp_path / "next") as docker:  # same namespace: docker0 and the rules are there already
        assert not old.exists() and not Path(left["record"]).exists()
        assert not any(dockerbed.alive(pid) for pid in survivors)
        box = docker.run(docker.client_image(), "sh", "-c", "ip -4 -o addr show eth0", detach=False)
        assert " 172.17." in box.stdout
    assert dockerbed._cmdline_pids(old) == []
