"""Borrowed identities, on the running agent: a process that execs another program used to keep the identity of
what it ran before (the caller cache survived exec), and code preloaded into an allowed executable acts as it."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from imds_agent.sandbox.agentproc import AgentProcess
from imds_agent.sandbox.netns import Sandbox

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
    with Sandbox() as sandbox:
        os.makedirs(os.path.join(sandbox.workdir, "policy.d"))
        with open(os.path.join(sandbox.workdir, "policy.d", "50-test.yaml"), "w", encoding="utf-8") as fh:
            fh.write(POLICY)
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
