"""`make demo`: the agent doing its job in a sandbox, end to end, with real programs as clients.

A network namespace plays the host (no default route: nothing leaves it), another holds the metadata addresses
and the emulator with IMDSv1 disabled. The agent runs in the host namespace as root, installs its redirect and
drops to its own uid; clients run as ordinary uids. The emulator's counters show what reached the "real" service.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional

from .. import subproc
from .agentproc import AGENT_UID, AgentProcess
from .netns import Sandbox

NOBODY = 65534
APP_UID = 1000
OTHER_UID = 1001
SHIPPED_RULES = str(Path(__file__).resolve().parents[3] / "rules")
BASE = "http://169.254.169.254/latest"
BASE6 = "http://[fd00:ec2::254]/latest"
ROLE_PATH = "/meta-data/iam/security-credentials/"


def say(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m", flush=True)


def show(label: str, proc: subprocess.CompletedProcess[str], limit: int = 300) -> str:
    out = proc.stdout.strip()
    body, _, code = out.rpartition("\n")
    if "<title>" in body:  # the service's HTML error page: its title says it all
        body = body.split("<title>", 1)[1].split("</title>", 1)[0]
    shown = body if len(body) <= limit else body[:limit] + " ..."
    print(f"  {label}\n    -> HTTP {code or '?'} {shown.strip().replace(chr(10), ' | ')}", flush=True)
    return code


def curl(
    sbx: Sandbox, uid: int, url: str, *extra: str, exe: str = "curl", ns: str = "host", wait: int = 5
) -> subprocess.CompletedProcess[str]:
    argv = [exe, "-s", "-S", "--max-time", str(wait), "-w", "\n%{http_code}", *extra, url]
    return sbx.run(argv, uid=uid, timeout=wait + 5, ns=ns)


def install_demo_policy(sbx: Sandbox) -> str:
    """policy.d = the shipped drop-ins plus one rule for a demo 'billing-exporter' (a copy of curl, so that only
    its path differs from /usr/bin/curl); returns that program's path."""
    policy_dir = os.path.join(sbx.workdir, "policy.d")
    os.makedirs(policy_dir, exist_ok=True)
    if os.path.isdir(SHIPPED_RULES):
        for name in sorted(os.listdir(SHIPPED_RULES)):
            if name.endswith(".yaml"):
                shutil.copy(os.path.join(SHIPPED_RULES, name), policy_dir)
    exporter = os.path.join(sbx.workdir, "bin", "billing-exporter")
    os.makedirs(os.path.dirname(exporter))
    shutil.copy2(shutil.which("curl") or "/usr/bin/curl", exporter)
    with open(os.path.join(policy_dir, "50-demo.yaml"), "w", encoding="utf-8") as fh:
        fh.write(f"rules:\n  - name: billing-exporter\n    exe: {exporter}\n    uid: {APP_UID}\n"
                 "    sensitive: [credentials]\n")  # fmt: skip
    return exporter


def redact(proc: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    """Replace credential values in a JSON answer so the demo never prints a secret, even a fake one."""
    body, sep, code = proc.stdout.strip().rpartition("\n")
    try:
        doc: Any = json.loads(body)
    except ValueError:
        return proc
    if not isinstance(doc, dict):
        return proc
    for key in ("SecretAccessKey", "Token"):
        if key in doc:
            doc[key] = f"<{len(doc[key])} chars>"
    return subprocess.CompletedProcess(proc.args, proc.returncode, json.dumps(doc) + sep + code, proc.stderr)


def impostor(sbx: Sandbox, path: str, url: str) -> subprocess.CompletedProcess[str]:
    """Run curl as APP_UID under ``path`` from a private mount namespace where /usr/bin/curl is mounted over that
    path, as a host-network container can show its own file under any name."""
    base = os.path.join(sbx.workdir, "mnt")
    ns = os.path.join(base, "ns")
    os.makedirs(base)
    open(ns, "w").close()  # noqa: SIM115 - a mount point for the namespace file
    steps = [
        ["mount", "--bind", base, base],
        ["mount", "--make-private", base],  # unshare can pin a namespace only on a private mount
        ["unshare", f"--mount={ns}", "--propagation", "private", "true"],
        ["nsenter", f"--mount={ns}", "mount", "--bind", "/usr/bin/curl", path],
    ]
    try:
        for argv in steps:
            # In this mount namespace, not through the sandbox: `ip netns exec` gives each command a new one.
            subproc.run(argv, check=True)
        as_app = ["setpriv", f"--reuid={APP_UID}", f"--regid={APP_UID}", "--clear-groups"]
        request = ["-s", "-S", "--max-time", "5", "-w", "\n%{http_code}", url]
        # Into that mount namespace first, then the sandbox's network namespace (the other order is refused).
        enter = ["nsenter", f"--mount={ns}", "ip", "netns", "exec", sbx.host_ns]
        return subproc.run([*enter, *as_app, path, *request], timeout=10, check=False)
    finally:
        for target in (ns, base):
            subproc.run(["umount", target], check=False)


def counters(sbx: Sandbox) -> dict[str, int]:
    c = sbx.emulator_control.counters()
    return {k: c[k] for k in ("requests", "tokenless", "with_token", "token_puts", "unauthorized") if k in c}


def main(argv: Optional[list[str]] = None) -> int:
    """Run the demo; exit non-zero if anything did not behave as described."""
    if os.geteuid() != 0:
        print("make demo needs root (network namespaces, kernel rules)", file=sys.stderr)
        return 77
    failures: list[str] = []

    def expect(ok: bool, what: str) -> None:
        print(f"    {'ok' if ok else 'UNEXPECTED'}: {what}", flush=True)
        if not ok:
            failures.append(what)

    with Sandbox(tokens="required") as sbx:
        say("The metadata service requires tokens (IMDSv1 disabled); no agent yet")
        code = show(f"uid {NOBODY}: curl {BASE}{ROLE_PATH}", curl(sbx, NOBODY, BASE + ROLE_PATH))
        expect(code == "401", "a plain IMDSv1 GET is refused with 401")
        for name, address in (("billing", "172.30.0.2"), ("web", "172.30.0.3")):
            sbx.add_container(name, address)
        put_args = ("-X", "PUT", "-H", "X-aws-ec2-metadata-token-ttl-seconds: 60")
        proc = curl(sbx, NOBODY, BASE + "/api/token", *put_args, ns="web", wait=2)
        code = show("container 'web' (its own network namespace, behind the host's bridge): token PUT", proc)
        expect(code == "000", "no answer: the service's hop limit of 1 drops it one routed hop away")
        sbx.emulator_control.reset()

        say(f"Starting imds-agent in enforce mode (root, then drops to uid {AGENT_UID})")
        exporter = install_demo_policy(sbx)
        agent = AgentProcess(sbx, mode="enforce", extra="containers: {enabled: true}\n").start()
        try:
            rule_lines = agent.cli("rules", "show").stdout.strip().splitlines()
            shown = [line for line in rule_lines if "iifname" not in line]  # the container interfaces, one each
            print("  " + "\n  ".join(shown))
            print(f"    ... and {len(rule_lines) - len(shown)} rules for connections from container interfaces")
            print(f"  policy: the shipped drop-ins from rules/, plus {exporter} may read the role credentials as uid"
                  f" {APP_UID}; everyone else gets the default (allow-nonsensitive)")  # fmt: skip

            say("Allowed: IMDSv1 clients the policy names get what they ask for")
            proc = curl(sbx, APP_UID, BASE + ROLE_PATH, exe=exporter)
            code = show(f"uid {APP_UID}: {exporter} {BASE}{ROLE_PATH}", proc)
            role = proc.stdout.strip().rpartition("\n")[0].strip()
            expect(code == "200" and bool(role), "the role name is listed")
            code = show(
                f"uid {APP_UID}: {exporter} {BASE6}{ROLE_PATH}{role}",
                redact(curl(sbx, APP_UID, BASE6 + ROLE_PATH + role, exe=exporter)),
            )
            expect(code == "200", "the role credentials arrive, over IPv6 too")
            py = [
                "python3",
                "-c",
                "import urllib.request as u; r = u.urlopen('http://169.254.169.254/latest/meta-data/instance-id',"
                " timeout=5); print(r.read().decode()); print(r.status)",
            ]
            code = show(f"uid {NOBODY}: python3 urllib GET instance-id", sbx.run(py, uid=NOBODY, timeout=10))
            expect(code == "200", "non-sensitive metadata is open to everyone (default allow-nonsensitive)")

            say("Denied: the same request from a program the policy does not name")
            code = show(f"uid {NOBODY}: /usr/bin/curl {BASE}{ROLE_PATH}", curl(sbx, NOBODY, BASE + ROLE_PATH))
            expect(code == "403", "curl may not read the role credentials")
            proc = curl(sbx, OTHER_UID, BASE + ROLE_PATH, exe=exporter)
            code = show(f"uid {OTHER_UID}: {exporter} (right program, wrong uid)", proc)
            expect(code == "403", "the exporter as another uid is denied")
            proc = curl(sbx, NOBODY, BASE + ROLE_PATH, "-A", "amazon-ssm-agent/3.3.1802.0")
            code = show(f"uid {NOBODY}: /usr/bin/curl pretending to be amazon-ssm-agent (User-Agent)", proc)
            expect(code == "403", "a faked User-Agent changes nothing")

            say("Denied: an impostor at the exporter's path, from a mount namespace of its own")
            code = show(
                f"uid {APP_UID}: {exporter}, which in its namespace is /usr/bin/curl mounted over that path",
                impostor(sbx, exporter, BASE + ROLE_PATH),
            )
            expect(code == "403", "the path is not enough: the running file must be the one the rule names")

            say("An IMDSv2 client passes through untouched")
            put = curl(sbx, APP_UID, BASE + "/api/token", "-X", "PUT", "-H", "X-aws-ec2-metadata-token-ttl-seconds: 60")
            token = put.stdout.strip().rpartition("\n")[0]
            print(f"  uid {APP_UID}: PUT /latest/api/token -> {len(token)}-char token (not shown)")
            hdr = f"X-aws-ec2-metadata-token: {token}"
            code = show(
                f"uid {APP_UID}: GET with its own token", curl(sbx, APP_UID, BASE + "/meta-data/instance-id", "-H", hdr)
            )
            expect(code == "200", "the client's own token is used")

            say("Containers with network namespaces of their own go through the agent too (hop limit stays 1)")
            proc = redact(curl(sbx, APP_UID, BASE + ROLE_PATH + role, exe=exporter, ns="billing"))
            code = show(f"container 'billing', uid {APP_UID}: {exporter} {BASE}{ROLE_PATH}{role}", proc)
            expect(code == "200", "allowed: the exporter in a container gets the credentials")
            proc = curl(sbx, NOBODY, BASE + ROLE_PATH, ns="web")
            code = show(f"container 'web', uid {NOBODY}: curl {BASE}{ROLE_PATH}", proc)
            expect(code == "403", "denied: curl in a container may not read the role credentials")
            put_v2 = curl(sbx, NOBODY, BASE + "/api/token", *put_args, ns="web")
            token = put_v2.stdout.strip().rpartition("\n")[0]
            hdr = f"X-aws-ec2-metadata-token: {token}"
            code = show(f"container 'web': IMDSv2 instance-id with its own token ({len(token)} chars, not shown)",
                        curl(sbx, NOBODY, BASE + "/meta-data/instance-id", "-H", hdr, ns="web"))  # fmt: skip
            expect(code == "200", "its token PUT is answered now: the agent asks the service from the host")

            say("A token PUT relayed by a proxy (X-Forwarded-For) is refused, as the real service does")
            code = show(
                f"uid {NOBODY}: PUT with X-Forwarded-For",
                curl(sbx, NOBODY, BASE + "/api/token", "-X", "PUT", "-H", "X-aws-ec2-metadata-token-ttl-seconds: 60",
                     "-H", "X-Forwarded-For: 203.0.113.7"),
            )  # fmt: skip
            expect(code == "403", "relayed token PUT refused")

            say("What the metadata service saw")
            seen = counters(sbx)
            print("  " + json.dumps(seen))
            expect(seen.get("tokenless") == 0, "zero tokenless (IMDSv1) requests reached the service")
        finally:
            say("Stopping the agent (SIGTERM); fail_mode open removes the redirect")
            agent.stop(signal.SIGTERM)
        rules = agent.cli("rules", "show")
        print("  " + rules.stdout.strip().replace("\n", "\n  "))
        expect("state: absent" in rules.stdout, "no rules left behind")

        say("The report: who called, how often with IMDSv1, what was denied (imds-agent report)")
        report = agent.cli("report")
        print("  " + report.stdout.strip().replace("\n", "\n  "))
        expect(exporter in report.stdout and "/usr/bin/curl" in report.stdout, "every caller is in the report")
        audit_log = os.path.join(sbx.workdir, "audit", "audit.jsonl")
        with open(audit_log, encoding="utf-8") as fh:
            last_denied = [line for line in fh if '"decision":"deny"' in line][-1]
        print(f"  one audit record ({audit_log}):\n  {last_denied.strip()}")

    say("Result")
    if failures:
        print(f"  {len(failures)} unexpected result(s): {'; '.join(failures)}")
        return 1
    print("  everything behaved as described")
    return 0


if __name__ == "__main__":
    sys.exit(main())
