"""Per-executable policy on real processes: copies of one client under different paths, scripts under one
interpreter, different uids, both address families; reload; the audit -> suggest -> enforce round trip."""

from __future__ import annotations

import json
import os
import shutil
import signal
from collections.abc import Iterator

import pytest

from imds_agent.sandbox.agentproc import AgentProcess
from imds_agent.sandbox.netns import Sandbox, wait_for

pytestmark = pytest.mark.privileged
APP, OTHER = 1000, 1001
CREDS = "/latest/meta-data/iam/security-credentials/"
BASE = {"ipv4": "http://169.254.169.254", "ipv6": "http://[fd00:ec2::254]"}
SCRIPT = (
    "import sys, urllib.request, urllib.error\n"
    "try:\n"
    "    r = urllib.request.urlopen(sys.argv[1], timeout=5); print(r.status); print(r.read().decode())\n"
    "except urllib.error.HTTPError as e:\n"
    "    print(e.code); print(e.read().decode())\n"
)


@pytest.fixture
def sbx() -> Iterator[Sandbox]:
    with Sandbox() as sandbox:
        bindir = os.path.join(sandbox.workdir, "bin")
        os.makedirs(bindir)
        for name in ("allowed-curl", "other-curl"):
            shutil.copy2("/usr/bin/curl", os.path.join(bindir, name))
        for name in ("allowed.py", "other.py"):
            with open(os.path.join(bindir, name), "w", encoding="utf-8") as fh:
                fh.write(SCRIPT)
        os.makedirs(os.path.join(sandbox.workdir, "policy.d"))
        yield sandbox


def write_policy(sbx: Sandbox, name: str, text: str) -> None:
    with open(os.path.join(sbx.workdir, "policy.d", name), "w", encoding="utf-8") as fh:
        fh.write(text)


def curl(sbx: Sandbox, exe: str, uid: int, url: str, *extra: str) -> tuple[str, str]:
    path = os.path.join(sbx.workdir, "bin", exe)
    out = sbx.run([path, "-s", "--max-time", "5", "-w", "\n%{http_code}", *extra, url], uid=uid).stdout
    body, _, code = out.rpartition("\n")
    return code, body


def script(sbx: Sandbox, name: str, uid: int, url: str) -> tuple[str, str]:
    out = sbx.run(["/usr/bin/python3", os.path.join(sbx.workdir, "bin", name), url], uid=uid).stdout
    code, _, body = out.partition("\n")
    return code, body.strip()


POLICY = """
rules:
  - name: allowed-curl-for-app
    exe: {bindir}/allowed-curl
    uid: {app}
    sensitive: [credentials]
  - name: allowed-script
    exe: [/usr/bin/python3, /usr/bin/python3.*]
    cmdline: "*/allowed.py *"
    paths: ["meta-data/placement/**"]
"""


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_enforce_allows_and_denies_per_executable_and_uid(sbx: Sandbox, family: str) -> None:
    bindir = os.path.join(sbx.workdir, "bin")
    write_policy(sbx, "50-test.yaml", POLICY.format(bindir=bindir, app=APP))
    agent = AgentProcess(sbx, mode="enforce", extra="").start()
    base = BASE[family]
    try:
        code, role = curl(sbx, "allowed-curl", APP, base + CREDS)
        assert code == "200" and role == "imds-agent-demo-role"
        code, body = curl(sbx, "allowed-curl", APP, f"{base}{CREDS}{role}")
        assert code == "200" and json.loads(body)["Code"] == "Success"
        code, body = curl(sbx, "allowed-curl", OTHER, base + CREDS)
        assert code == "403" and f"exe={bindir}/allowed-curl uid={OTHER}" in body
        code, body = curl(sbx, "other-curl", APP, base + CREDS)
        assert code == "403" and "default: allow-nonsensitive" in body
        # Not sensitive: the default lets anyone read the rest.
        assert curl(sbx, "other-curl", APP, base + "/latest/meta-data/instance-id")[0] == "200"
        # A faked User-Agent changes nothing.
        assert curl(sbx, "other-curl", APP, base + CREDS, "-A", "amazon-ssm-agent/3.3.0")[0] == "403"
        assert script(sbx, "allowed.py", OTHER, base + "/latest/meta-data/placement/region") == ("200", "eu-west-1")
        code, body = script(sbx, "allowed.py", OTHER, base + CREDS)
        assert code == "403" and "allowed-script" in body
        assert script(sbx, "other.py", OTHER, base + CREDS)[0] == "403"
        counters = sbx.emulator_control.counters()
        assert counters["tokenless"] == 0
    finally:
        agent.stop()
    lines = [json.loads(x) for x in open(os.path.join(sbx.workdir, "audit", "audit.jsonl"), encoding="utf-8")]
    denied = [x for x in lines if x["decision"] == "deny"]
    assert len(denied) == 5 and all(x["status"] == 403 for x in denied)
    assert {x["exe"] for x in lines} >= {f"{bindir}/allowed-curl", f"{bindir}/other-curl"}
    assert any(x["user_agent"] == "amazon-ssm-agent/3.3.0" and x["decision"] == "deny" for x in lines)


def test_sighup_with_a_broken_policy_keeps_the_old_one(sbx: Sandbox) -> None:
    bindir = os.path.join(sbx.workdir, "bin")
    write_policy(sbx, "50-test.yaml", POLICY.format(bindir=bindir, app=APP))
    agent = AgentProcess(sbx, mode="enforce").start()
    url = BASE["ipv4"] + CREDS
    try:
        assert curl(sbx, "allowed-curl", APP, url)[0] == "200"
        write_policy(sbx, "60-broken.yaml", "rules:\n  - exe: /usr/bin/x\n    sensitive: [passwords]\n")
        assert agent.proc is not None
        agent.proc.send_signal(signal.SIGHUP)
        assert wait_for(lambda: "reload refused" in agent.log(), 5)
        assert "60-broken.yaml:3: rules[0].sensitive" in agent.log()
        assert curl(sbx, "allowed-curl", APP, url)[0] == "200"
        assert curl(sbx, "other-curl", APP, url)[0] == "403"
        write_policy(sbx, "60-broken.yaml", f"rules:\n  - exe: {bindir}/other-curl\n    sensitive: [credentials]\n")
        agent.proc.send_signal(signal.SIGHUP)
        assert wait_for(lambda: "reloaded: enforce mode, 3 policy rules" in agent.log(), 5)
        assert curl(sbx, "other-curl", APP, url)[0] == "200"
    finally:
        agent.stop()


def test_audit_suggest_enforce_round_trip(sbx: Sandbox) -> None:
    base = BASE["ipv4"]
    audit = AgentProcess(sbx, mode="audit", extra="").start()
    try:
        assert curl(sbx, "allowed-curl", APP, base + CREDS)[0] == "200"
        assert curl(sbx, "allowed-curl", APP, base + "/latest/meta-data/placement/region")[0] == "200"
        assert script(sbx, "allowed.py", OTHER, base + "/latest/meta-data/instance-id")[0] == "200"
    finally:
        audit.stop()
    report = json.loads(audit.cli("report", "--json", check=True).stdout)
    curl_row = next(r for r in report if r["exe"].endswith("/allowed-curl"))
    assert curl_row["imdsv1"] == 2 and curl_row["would_deny"] == 1 and curl_row["sensitive"] == ["credentials"]
    suggested = os.path.join(sbx.workdir, "policy.d", "50-suggested.yaml")
    assert audit.cli("suggest", "-o", suggested).returncode == 0
    assert audit.cli("suggest", "-o", suggested).returncode == 1  # never overwrites
    with open(audit.config, encoding="utf-8") as fh:
        text = fh.read().replace("default: allow-nonsensitive}", "default: deny}")
    with open(audit.config, "w", encoding="utf-8") as fh:
        fh.write(text)
    enforce = audit.start(mode="enforce")
    try:
        assert curl(sbx, "allowed-curl", APP, base + CREDS)[0] == "200"
        assert curl(sbx, "allowed-curl", APP, base + "/2021-03-23/meta-data/placement/availability-zone")[0] == "200"
        assert script(sbx, "allowed.py", OTHER, base + "/latest/meta-data/instance-id")[0] == "200"
        assert curl(sbx, "allowed-curl", APP, base + "/latest/meta-data/instance-id")[0] == "403"  # never seen
        assert curl(sbx, "allowed-curl", OTHER, base + CREDS)[0] == "403"
        assert curl(sbx, "other-curl", APP, base + CREDS)[0] == "403"
        assert script(sbx, "allowed.py", OTHER, base + CREDS)[0] == "403"
    finally:
        enforce.stop()
    explain = audit.cli("explain", "--exe", f"{sbx.workdir}/bin/allowed-curl", "--uid", str(APP), "--path", CREDS)
    assert explain.returncode == 0 and explain.stdout.startswith("allow:") and "seen:" in explain.stdout


def test_a_same_named_binary_from_another_mount_namespace_is_not_the_allowed_one(sbx: Sandbox) -> None:
    """What a container (or any private mount namespace) can do: present its own file at the allowed path. The
    process's exe link then names that path, but the file is not the host's, so the rule must not match."""
    bindir = os.path.join(sbx.workdir, "bin")
    allowed, other = os.path.join(bindir, "allowed-curl"), os.path.join(bindir, "other-curl")
    write_policy(sbx, "50-test.yaml", POLICY.format(bindir=bindir, app=APP))
    agent = AgentProcess(sbx, mode="enforce").start()
    try:
        as_app = ["setpriv", f"--reuid={APP}", f"--regid={APP}", "--clear-groups"]
        request = ["-s", "--max-time", "5", "-w", "\n%{http_code}", "http://169.254.169.254" + CREDS]
        impostor = ["unshare", "--mount", "--propagation", "private", "/bin/sh", "-c",
                    'mount --bind "$1" "$2" && shift 2 && exec "$@"', "sh", other, allowed,
                    *as_app, allowed, *request]  # fmt: skip
        out = sbx.run(impostor).stdout
        assert out.endswith("\n403"), out
        assert curl(sbx, "allowed-curl", APP, "http://169.254.169.254" + CREDS)[0] == "200"  # the real one
    finally:
        agent.stop()
    lines = [json.loads(x) for x in open(os.path.join(sbx.workdir, "audit", "audit.jsonl"), encoding="utf-8")]
    impostor_line, real_line = lines[0], lines[1]
    assert impostor_line["exe"] == allowed and impostor_line["exe_verified"] is False
    assert impostor_line["decision"] == "deny" and real_line["exe_verified"] is True


SHARER = """
import os, socket, subprocess, sys, time
allowed, url_host, path = sys.argv[1:4]
s = socket.socket()  # created before the fork, so the child inherits it
os.set_inheritable(s.fileno(), True)
# The child becomes the allowed program (holding the inherited socket) and makes a request of its own, so the
# agent has just seen its pid; --rate keeps it alive, waiting before a second transfer.
child = subprocess.Popen([allowed, "-s", "-o", "/dev/null", "--rate", "2/m", url_host + "/latest/meta-data/ami-id",
                          url_host + "/latest/meta-data/ami-id"], pass_fds=[s.fileno()])
time.sleep(1.5)
s.connect(("169.254.169.254", 80))
s.sendall(("GET " + path + " HTTP/1.1\\r\\nHost: 169.254.169.254\\r\\nConnection: close\\r\\n\\r\\n").encode())
reply = b""
while True:
    chunk = s.recv(65536)
    if not chunk:
        break
    reply += chunk
child.kill()
print(reply.split(b"\\r\\n")[0].decode())
print(reply.split(b"\\r\\n\\r\\n", 1)[-1].decode())
"""


def test_a_socket_shared_with_an_allowed_program_does_not_borrow_its_identity(sbx: Sandbox) -> None:
    """A program may hand its socket to a child that runs an allowed executable and read the answer itself; the
    connection is then held by two different executables and must not be judged as the allowed one."""
    bindir = os.path.join(sbx.workdir, "bin")
    write_policy(sbx, "50-test.yaml", POLICY.format(bindir=bindir, app=APP))
    with open(os.path.join(bindir, "sharer.py"), "w", encoding="utf-8") as fh:
        fh.write(SHARER)
    agent = AgentProcess(sbx, mode="enforce").start()
    try:
        argv = ["/usr/bin/python3", os.path.join(bindir, "sharer.py"), os.path.join(bindir, "allowed-curl"),
                "http://169.254.169.254", CREDS]  # fmt: skip
        status, _, body = sbx.run(argv, uid=APP).stdout.partition("\n")
        assert status == "HTTP/1.1 403 Forbidden", (status, body)
    finally:
        agent.stop()
    lines = [json.loads(x) for x in open(os.path.join(sbx.workdir, "audit", "audit.jsonl"), encoding="utf-8")]
    shared = [x for x in lines if x["path"].startswith("/latest/meta-data/iam")]
    assert shared and shared[0]["exe"] == os.path.join(bindir, "allowed-curl")  # the newest caller, found first
    assert "/usr/bin/python3" in shared[0]["shared_with"][0]
    assert shared[0]["decision"] == "deny" and "shared with" in shared[0]["reason"]


def test_a_shell_scripts_dev_tcp_connection_read_by_cat_still_reads_instance_metadata(sbx: Sandbox) -> None:
    """bash opens the connection and its children (sleep, cat) inherit it: whichever of them the agent finds
    holding the socket, instance metadata is allowed to all by the default and credentials to none."""
    agent = AgentProcess(sbx, mode="enforce").start()
    script = ('exec 3<>/dev/tcp/169.254.169.254/80; sleep 0.3; '
              'printf "GET %s HTTP/1.0\\r\\nHost: 169.254.169.254\\r\\n\\r\\n" "$1" >&3; cat <&3')  # fmt: skip
    try:
        out = sbx.run(["/bin/bash", "-c", script, "bash", "/latest/meta-data/instance-id"], uid=APP).stdout
        assert out.startswith("HTTP/1.1 200") and out.rstrip().endswith(("i-0e1a2b3c4d5e6f708",)), out
        out = sbx.run(["/bin/bash", "-c", script, "bash", CREDS], uid=APP).stdout
        assert out.startswith("HTTP/1.1 403"), out
    finally:
        agent.stop()
