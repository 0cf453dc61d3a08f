"""Containers under a real Docker daemon and containerd, through the agent: Debian's dockerd and containerd run in
the sandbox's host namespace (tests/privileged/dockerbed.py), with their real bridges, veths and nat rules, and
real clients inside the containers (curl, python3 with botocore, the AWS CLI).

Rules by image and label, a container's copy of a host path against a host rule, a ctr container by annotation,
the records' workload, and Docker's own nat rules still working beside the agent's.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from imds_agent.sandbox.agentproc import AgentProcess
from imds_agent.sandbox.netns import Sandbox, wait_for

from .dockerbed import CTR_NAMESPACE, Docker, DockerUnavailable, docker_daemon

pytestmark = [pytest.mark.privileged, pytest.mark.timeout(600)]
BASE = "http://169.254.169.254/latest"
CREDS = f"{BASE}/meta-data/iam/security-credentials/"
IMAGE_GLOB = "docker.io/imds-agent-test/client:*"
POLICY = f"""rules:
  - name: billing-containers
    container: {{image: "{IMAGE_GLOB}", labels: {{team: billing}}}}
    sensitive: [credentials]
  - name: prod-jobs
    container: {{runtime: containerd}}
    pod: {{namespace: prod}}
    sensitive: [credentials]
  - name: host-curl
    exe: /usr/bin/curl
    uid: 0
    sensitive: [credentials]
"""


@contextmanager
def bed(sbx: Sandbox, workdir: Path) -> Iterator[Docker]:
    try:
        with docker_daemon(sbx.host_ns, workdir) as docker:
            yield docker
    except DockerUnavailable as exc:
        pytest.skip(f"dockerd cannot run here: {exc}")


def status(docker: Docker, name: str, url: str, *args: str) -> str:
    proc = docker.exec(name, "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "5", *args, url,
                       check=False)  # fmt: skip
    return proc.stdout.strip()


def records(agent: AgentProcess) -> list[dict[str, object]]:
    with open(f"{agent.sbx.workdir}/audit/audit.jsonl", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip() and '"summary"' not in line]


@pytest.fixture
def sbx() -> Iterator[Sandbox]:
    with Sandbox() as sandbox:
        yield sandbox


def test_docker_containers_are_judged_by_image_label_and_annotation(sbx: Sandbox, tmp_path: Path) -> None:
    with bed(sbx, tmp_path / "d") as docker:
        image = docker.client_image()
        docker.run(image, name="billing", labels={"team": "billing"})
        docker.network_create("apps", "10.231.0.0/24")
        docker.run(image, name="web", network="apps")
        os.makedirs(f"{sbx.workdir}/policy.d")
        with open(f"{sbx.workdir}/policy.d/50-containers.yaml", "w", encoding="utf-8") as fh:
            fh.write(POLICY)
        ctrd = docker.containerd
        extra = (f"containers: {{docker_root: {docker.data_root}, containerd_state: {ctrd.state}, "
                 f"containerd_namespaces: [{CTR_NAMESPACE}]}}\n")  # fmt: skip
        agent = AgentProcess(sbx, mode="enforce", backend="nftables", extra=extra, audit=", rate_per_uid: 0").start()
        try:
            # Without a token of its own (IMDSv1), through the agent: the labelled container gets the role.
            assert status(docker, "billing", CREDS) == "200", agent.log()[-3000:]
            # Same image, no label, on a user-defined network: the default (non-sensitive only).
            assert status(docker, "web", CREDS) == "403"
            assert status(docker, "web", f"{BASE}/meta-data/instance-id") == "200"
            # Its /usr/bin/curl is the image's file, not the host's: the host rule for /usr/bin/curl (uid 0) does
            # not match it, although path and uid are the same.
            assert status(docker, "web", CREDS) == "403"
            # Real SDK clients inside: botocore's IMDS provider (token PUT, then GET) and the AWS CLI.
            boto = docker.exec("billing", "python3", "-c", "import botocore.session as s; "
                               "c = s.get_session().get_credentials(); print(c.method, len(c.access_key))")  # fmt: skip
            assert boto.stdout.split() == ["iam-role", "20"], boto.stderr[-2000:]
            cli = docker.exec("billing", "aws", "configure", "list", check=False)
            assert "iam-role" in cli.stdout, cli.stdout + cli.stderr
            denied = docker.exec("web", "python3", "-c", "import botocore.session as s; "
                                 "print(s.get_session().get_credentials())", check=False)  # fmt: skip
            assert denied.stdout.strip() == "None"
            # A containerd pod sandbox's container, by the CRI's namespace annotation.
            # Its own namespace on Docker's bridge, as a CNI plugin would give a pod.
            pod_ns = sbx.add_container("job", "172.17.0.200", bridge="docker0", gateway=docker.gateway(), prefixlen=16)
            job = ctrd.run(ctrd.client_image(), "job", "sleep", "infinity", netns=pod_ns,
                           annotations={"io.kubernetes.cri.sandbox-namespace": "prod"})  # fmt: skip
            code = ctrd.exec(job.id, "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "5", CREDS)
            assert code.stdout.strip() == "200", agent.log()[-2000:]

            # Docker's own nat rules work beside the agent's: a published port, reached from a container on the same
            # bridge (Docker's isolation rules keep other networks off it).
            docker.cli("run", "-d", "--name", "srv", "-p", "8080:8000", image, "python3", "-m", "http.server", "8000")
            published = f"http://{docker.gateway()}:8080/"
            assert wait_for(lambda: status(docker, "billing", published) == "200", 20), sbx.run(
                ["nft", "list", "ruleset"]
            ).stdout
            assert "DOCKER" in sbx.run(["iptables-save", "-t", "nat"]).stdout

            got = records(agent)
            billing = [r for r in got if str(r["rule"]).startswith("billing-containers (")]
            assert billing, [r.get("rule") for r in got]
            work = billing[0]["workload"]
            assert isinstance(work, dict)
            assert work["name"] == "billing" and work["runtime"] == "docker"
            assert work["image"] == "docker.io/imds-agent-test/client:1"
            assert billing[0]["container"] == docker.id("billing")
            web = [r for r in got if isinstance(r.get("workload"), dict) and r["workload"].get("name") == "web"]  # type: ignore[attr-defined]
            assert web and all(r["exe_verified"] is False for r in web)
            jobs = [r for r in got if str(r["rule"]).startswith("prod-jobs (")]
            assert jobs and jobs[0]["workload"]["pod"]["namespace"] == "prod"  # type: ignore[index]
        finally:
            agent.stop()
