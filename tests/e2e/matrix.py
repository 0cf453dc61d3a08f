"""The compatibility matrix: every client x upstream x mode, as an allowed and as a denied uid.

    python tests/e2e/matrix.py        (make e2e) prints the matrix; tests/e2e/test_matrix.py asserts it.

Upstreams: the project's emulator and ministack (third-party), both with IMDSv1 disabled. The agent enforces a
policy that grants everything to uid 1000 and nothing to uid 1001 (default deny). A cell is "ok" when the allowed
uid got its value, the denied uid failed with the agent's 403 in enforce (or got it, recorded as would-deny, in
audit), and the upstream counted zero tokenless requests throughout.

The "container" column runs the clients that can inside Docker containers on the default bridge (a real dockerd,
tests/privileged/dockerbed.py; the clients' virtual environment mounted read-only) against the emulator with its
hop limit of 1: the allowed one is the container labelled ``e2e: allowed``, the denied one a container without it.
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
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "agent"))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.e2e.clients import CLIENT_VENV, CLIENTS, MINISTACK_VENV, NODE_DIR, Client, install  # noqa: E402

from imds_agent.sandbox.agentproc import AgentProcess  # noqa: E402
from imds_agent.sandbox.netns import Sandbox  # noqa: E402

ALLOWED, DENIED = 1000, 1001
UPSTREAMS = ("emulator", "ministack")
CONTAINER = "container"  # the column of clients inside Docker containers (emulator upstream)
CONTAINER_CLIENTS = ("curl", "python-requests", "boto3", "awscli-v1", "ec2-metadata")
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
        "  - name: e2e-allowed-container\n    container: {labels: {e2e: allowed}}\n    sensitive: all\n"
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


def _workload_name(record: dict[str, object]) -> object:
    work = record.get("workload")
    return work.get("name") if isinstance(work, dict) else None


def _run_in_container(docker: Any, client: Client, name: str) -> tuple[bool, str]:
    env = ["env", "HOME=/tmp", "AWS_METADATA_SERVICE_NUM_ATTEMPTS=1", "AWS_METADATA_SERVICE_TIMEOUT=3"]
    proc = docker.exec(name, *env, *client.argv, check=False, timeout=60)
    output = proc.stdout + proc.stderr
    got = proc.returncode == 0 and re.search(client.expect, proc.stdout, re.MULTILINE) is not None
    return got, output.strip()[-300:]


def check(
    sbx: Sandbox, agent: AgentProcess, client: Client, mode: str, upstream: str, docker: Optional[Any] = None
) -> Cell:
    """Run ``client`` as the allowed and the denied uid (in the allowed and the denied container with
    ``docker``); judge the cell."""
    cell = Cell(client.name, upstream, mode, gap=UPSTREAM_GAPS.get((client.name, upstream), ""))
    log = Path(sbx.workdir) / "audit" / "audit.jsonl"
    for uid in (ALLOWED, DENIED):
        sbx.emulator_control.reset()
        _, offset = _records(log, 0)
        if docker is None:
            got, output = _run_client(sbx, client, uid)
        else:
            got, output = _run_in_container(docker, client, "allowed" if uid == ALLOWED else "denied")
        time.sleep(0.05)  # the record is written right after the answer is sent
        records, _ = _records(log, offset)
        if docker is None:
            mine = [r for r in records if r.get("uid") == uid]
        else:
            want = "allowed" if uid == ALLOWED else "denied"
            mine = [r for r in records if _workload_name(r) == want]
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


def run_containers(modes: tuple[str, ...] = MODES) -> Iterator[Cell]:
    """The container column: a sandbox, a real dockerd in it, the allowed and the denied container."""
    import tempfile

    from tests.privileged.dockerbed import DockerUnavailable, docker_daemon

    with Sandbox() as sbx, tempfile.TemporaryDirectory(prefix="e2e-d-", dir="/tmp") as tmp:
        _prepare(sbx)
        try:
            with docker_daemon(sbx.host_ns, Path(tmp) / "d") as docker:
                image = docker.client_image()
                venv = str(CLIENT_VENV)
                for name, labels in (("allowed", ["--label", "e2e=allowed"]), ("denied", [])):
                    docker.cli("run", "-d", "--name", name, *labels, "-v", f"{venv}:{venv}:ro", image, "sleep",
                               "infinity")  # fmt: skip
                extra = f"containers: {{docker_root: {docker.data_root}}}\n"
                for mode in modes:
                    agent = AgentProcess(sbx, mode=mode, policy_default="deny", extra=extra,
                                         audit=", rate_per_uid: 0").start()  # fmt: skip
                    try:
                        for client in CLIENTS:
                            if client.name in CONTAINER_CLIENTS:
                                yield check(sbx, agent, client, mode, CONTAINER, docker)
                    finally:
                        agent.stop()
        except DockerUnavailable as exc:
            for mode in modes:
                for name in CONTAINER_CLIENTS:
                    yield Cell(name, CONTAINER, mode, [f"dockerd cannot run here: {exc}"])


def run(upstreams: tuple[str, ...] = UPSTREAMS, modes: tuple[str, ...] = MODES) -> Iterator[Cell]:
    """Every cell, upstream by upstream (one sandbox each), mode by mode (one agent each), then the container
    column."""
    install()
    yield from _host_cells(upstreams, modes)
    yield from run_containers(modes)


def _host_cells(upstreams: tuple[str, ...], modes: tuple[str, ...]) -> Iterator[Cell]:
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
    columns = [(u, m) for u in (*UPSTREAMS, CONTAINER) for m in MODES]
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
