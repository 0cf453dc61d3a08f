"""Borrowed identities, on the running agent: a process that execs another program used to keep the identity of
what it ran before (the caller cache survived exec), and code preloaded into an allowed executable acts as it."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from imds_agent.sandbox.agentproc import AgentProcess
from imds_agent.sandbox.netns import Sandbox

from .attack_bed import policy_sandbox

pytestmark = pytest.mark.privileged
APP = 1000
CREDS = "/latest/meta-data/iam/security-credentials/"
POLICY = f"""rules:
  - name: perl-for-app
    exe: /usr/bin/perl
    uid: {APP}
    sensitive: [credentials]
  - name: curl-unpreloaded
    exe: /usr/bin/curl
    uid: {APP}
    sensitive: [credentials]
    refuse_preload: true
"""
# Perl asks once (and is identified, and cached), then execs Python in the same process, which asks for the
# credentials on a new connection.
ASK = "import http.client as h; c = h.HTTPConnection('169.254.169.254', 80, timeout=5); c.request('GET', '{path}'); "
ASK += "print(c.getresponse().status)"
PERL = (
    "use IO::Socket::INET; my $s = IO::Socket::INET->new('169.254.169.254:80') or die; "
    "print $s qq(GET /latest/meta-data/instance-id HTTP/1.0\\r\\n\\r\\n); my @r = <$s>; print $r[0]; close $s; "
    "exec '/usr/bin/python3', '-c', $ARGV[0];"
)


@pytest.fixture
def sbx() -> Iterator[Sandbox]:
    with policy_sandbox(POLICY) as sandbox:
        yield sandbox


def test_an_exec_does_not_keep_the_identity_of_what_ran_before(sbx: Sandbox) -> None:
    agent = AgentProcess(sbx, mode="enforce").start()
    try:
        out = sbx.run(["/usr/bin/perl", "-e", PERL, ASK.format(path=CREDS)], uid=APP)
    finally:
        agent.stop()
    first, _, second = out.stdout.strip().partition("\n")
    assert first.startswith("HTTP/1.1 200"), out.stdout + out.stderr  # perl, allowed, identified
    assert second.strip().splitlines()[-1] == "403", out.stdout + out.stderr  # python after the exec: not perl


def test_a_preloaded_caller_is_recorded_and_refused_by_rules_that_say_so(sbx: Sandbox) -> None:
    agent = AgentProcess(sbx, mode="enforce").start()
    curl = ["/usr/bin/curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "http://169.254.169.254" + CREDS]
    try:
        plain = sbx.run(curl, uid=APP).stdout
        preloaded = sbx.run(curl, uid=APP, env={"LD_PRELOAD": "/lib/x86_64-linux-gnu/libc.so.6"}).stdout
    finally:
        agent.stop()
    assert (plain, preloaded) == ("200", "403")
    lines = [json.loads(x) for x in Path(sbx.workdir, "audit", "audit.jsonl").read_text().splitlines()]
    curl_lines = [x for x in lines if x["exe"] == "/usr/bin/curl"]
    assert [x["preload"] for x in curl_lines] == [None, ["LD_PRELOAD"]]


# The launcher makes a socket, starts the allowed curl holding it (curl talks to a silent listener of its own),
# then forks the lender, and closes its own copy. The lender connects the shared socket (through the redirect),
# writes the request and reads the answer. curl and the lender are siblings: neither is the other's parent or
# child, and curl, the older, is the first holder a search of the uid's processes meets.
LENDER = """
import os, socket, subprocess, sys, time
silent = socket.socket()
silent.bind(("127.0.0.1", 0))
silent.listen(1)
s = socket.socket()
s.set_inheritable(True)
curl = subprocess.Popen(["/usr/bin/curl", "-s", "--max-time", "4", f"telnet://127.0.0.1:{silent.getsockname()[1]}"],
                        pass_fds=(s.fileno(),), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
time.sleep(0.3)
lender = os.fork()
if lender == 0:
    s.settimeout(5)
    s.connect(("169.254.169.254", 80))
    s.sendall(b"GET /latest/meta-data/iam/security-credentials/ HTTP/1.1\\r\\nHost: x\\r\\n"
              b"Connection: close\\r\\n\\r\\n")
    answer = b""
    while chunk := s.recv(65536):
        answer += chunk
    print(answer.split(b"\\r\\n", 1)[0].decode(), flush=True)
    os._exit(0)
s.close()
os.waitpid(lender, 0)
curl.kill()
"""


def test_a_socket_lent_to_an_allowed_sibling_gets_only_what_every_holder_may_have(sbx: Sandbox) -> None:
    agent = AgentProcess(sbx, mode="enforce").start()
    try:
        out = sbx.run(["/usr/bin/python3", "-c", LENDER], uid=APP)
    finally:
        agent.stop()
    assert out.stdout.strip() == "HTTP/1.1 403 Forbidden", out.stdout + out.stderr
    lines = [json.loads(x) for x in Path(sbx.workdir, "audit", "audit.jsonl").read_text().splitlines()]
    (record,) = [x for x in lines if x.get("sensitive") == "credentials"]
    holders = {record["exe"], *(h.split(" ", 1)[1] for h in record["shared_with"] or [])}
    assert record["exe"] == "/usr/bin/curl" and any("python3" in h for h in holders), record
