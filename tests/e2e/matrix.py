"""The compatibility matrix: every client x upstream x mode, as an allowed and as a denied uid.

    python tests/e2e/matrix.py        (make e2e) prints the matrix; tests/e2e/test_matrix.py asserts it.

Upstreams: the project's emulator and ministack (third-party), both with IMDSv1 disabled. The agent enforces a
policy that grants everything to uid 1000 and nothing to uid 1001 (default deny). A cell is "ok" when the allowed
uid got its value, the denied uid failed with the agent's 403 in enforce (or got it, recorded as would-deny, in
audit), and the upstream counted zero tokenless requests throughout.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "agent"))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.e2e.clients import CLIENTS, MINISTACK_VENV, NODE_DIR, Client, install  # noqa: E402

from imds_agent.sandbox.agentproc import AgentProcess  # noqa: E402
from imds_agent.sandbox.netns import Sandbox  # noqa: E402

ALLOWED, DENIED = 1000, 1001
UPSTREAMS = ("emulator", "ministack")
MODES = ("enforce", "audit")
# Where a third-party upstream does not behave like the real service, the cell records that instead of hiding it.
UPSTREAM_GAPS = {
    ("cloud-init", "ministack"): "ministack serves only /latest/, not the versioned paths (/2021-03-23/) cloud-init "
    "crawls and the real service serves; it answers them 400, which the agent passes on unchanged",
}


@dataclass
class Cell:
    """One client on one upstream in one mode."""

    client: str
    upstream: str
    mode: str
    problems: list[str] = field(default_factory=list)
    gap: str = ""

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def label(self) -> str:
        if self.gap and self.ok:
            return "n/a (upstream)"
        return "ok" if self.ok else "FAIL"


def _records(path: Path, offset: int) -> tuple[list[dict[str, object]], int]:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return [], offset
    return [json.loads(line) for line in data[offset:].splitlines() if line.strip()], len(data)


def _prepare(sbx: Sandbox) -> None:
    policy = Path(sbx.workdir) / "policy.d"
    policy.mkdir()
    (policy / "50-e2e.yaml").write_text(
        f"rules:\n  - name: e2e-allowed-uid\n    exe: /**\n    uid: {ALLOWED}\n    sensitive: all\n"
    )
    for uid in (ALLOWED, DENIED):
        home = Path(sbx.workdir) / f"home-{uid}"
        home.mkdir()
        os.chown(home, uid, uid)


def _run_client(sbx: Sandbox, client: Client, uid: int) -> tuple[bool, str]:
    env = {"HOME": f"{sbx.workdir}/home-{uid}", "NODE_PATH": str(NODE_DIR / "node_modules"),
           "AWS_METADATA_SERVICE_NUM_ATTEMPTS": "1", "AWS_METADATA_SERVICE_TIMEOUT": "3"}  # fmt: skip
    proc = sbx.run(list(client.argv), uid=uid, env=env, timeout=60)
    output = proc.stdout + proc.stderr
    got = proc.returncode == 0 and re.search(client.expect, proc.stdout, re.MULTILINE) is not None
    return got, output.strip()[-300:]


def check(sbx: Sandbox, agent: AgentProcess, client: Client, mode: str, upstream: str) -> Cell:
    """Run ``client`` as the allowed and the denied uid; judge the cell."""
    cell = Cell(client.name, upstream, mode, gap=UPSTREAM_GAPS.get((client.name, upstream), ""))
    log = Path(sbx.workdir) / "audit" / "audit.jsonl"
    for uid in (ALLOWED, DENIED):
        sbx.emulator_control.reset()
        _, offset = _records(log, 0)
        got, output = _run_client(sbx, client, uid)
        time.sleep(0.05)  # the record is written right after the answer is sent
        records, _ = _records(log, offset)
        mine = [r for r in records if r.get("uid") == uid]
        tokenless = sbx.emulator_control.counters()["tokenless"]
        if tokenless:
            cell.problems.append(f"uid {uid}: upstream saw {tokenless} tokenless requests")
        if cell.gap:
            # The agent must have let the request through and passed the upstream's own refusal on.
            upstream_refusals = [r for r in mine if r.get("decision") != "deny" and r.get("status") == 400]
            if got or (uid == ALLOWED and not upstream_refusals):
                cell.problems.append(f"uid {uid}: expected the upstream's 400: {output}")
            if uid == ALLOWED:
                continue
        elif uid == ALLOWED or mode == "audit":
            if not got:
                cell.problems.append(f"uid {uid} did not get its value: {output}")
        elif got:
            cell.problems.append(f"uid {uid} was not denied: {output}")
        if uid == DENIED:
            wanted = "deny" if mode == "enforce" else "would-deny"
            if not any(r.get("decision") == wanted for r in mine):
                cell.problems.append(f"uid {uid}: no {wanted} record")
            if mode == "enforce" and any(r.get("status") not in (403,) for r in mine if r.get("decision") == "deny"):
                cell.problems.append(f"uid {uid}: a deny without 403")
        if not mine:
            cell.problems.append(f"uid {uid}: the agent saw no request (client bypassed it?)")
    return cell


def run(upstreams: tuple[str, ...] = UPSTREAMS, modes: tuple[str, ...] = MODES) -> Iterator[Cell]:
    """Every cell, upstream by upstream (one sandbox each), mode by mode (one agent each)."""
    install()
    for upstream in upstreams:
        ministack = str(MINISTACK_VENV / "bin" / "ministack") if upstream == "ministack" else None
        with Sandbox(ministack=ministack) as sbx:
            _prepare(sbx)
            for mode in modes:
                agent = AgentProcess(sbx, mode=mode, policy_default="deny").start()
                try:
                    for client in CLIENTS:
                        yield check(sbx, agent, client, mode, upstream)
                finally:
                    agent.stop()


def render(cells: list[Cell]) -> str:
    """The matrix as a Markdown table (client rows, upstream x mode columns)."""
    columns = [(u, m) for u in UPSTREAMS for m in MODES]
    found = {(c.client, c.upstream, c.mode): c for c in cells}
    head = "| client | speaks | " + " | ".join(f"{u} / {m}" for u, m in columns) + " |"
    lines = [head, "|" + "---|" * (len(columns) + 2)]
    for client in CLIENTS:
        row = [client.name, client.speaks]
        for key in columns:
            cell = found.get((client.name, *key))
            row.append("-" if cell is None else cell.label)
        lines.append("| " + " | ".join(row) + " |")
    notes = [f"- n/a (upstream): {client} on {up}: {why}" for (client, up), why in UPSTREAM_GAPS.items()]
    return "\n".join(lines + [""] + notes)


def main() -> int:
    cells = []
    for cell in run():
        cells.append(cell)
        print(f"{cell.client:<30} {cell.upstream:<10} {cell.mode:<8} {cell.label}", flush=True)
        for problem in cell.problems:
            print(f"    {problem}", flush=True)
    print()
    print(render(cells))
    return 0 if all(c.ok for c in cells) else 1


if __name__ == "__main__":
    sys.exit(main())
