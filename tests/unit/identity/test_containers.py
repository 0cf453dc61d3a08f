"""Containers from the runtimes' own state: cgroup layouts, Docker's config.v2.json, containerd's task bundles, the
bounds on what is read, the cache, and the uid a user namespace shows."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from imds_agent.identity import containers
from imds_agent.identity.caller import ContainerInfo
from imds_agent.identity.containers import (
    ContainerDirectory,
    Location,
    describe_workload,
    locate,
    normalize_image,
    uid_inside,
)

DATA = Path(__file__).parent / "data"
ID = "4c01db0b339c8a1f2b5a1e6d3c7f9e8d0a2b4c6d8e0f1a3b5c7d9e1f3a5b7c9d"
OTHER = "9" * 64
POD_UID = "3f5e1f9c_5a0b_4f4e_9d8e_2b7c1a6d0e11"
DOCKER_SCOPE = f"0::/system.slice/docker-{ID}.scope\n"
CRI_SCOPE = (
    f"0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{POD_UID}.slice/cri-containerd-{ID}.scope\n"
)


def fixture(name: str, cid: str = ID) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((DATA / name).read_text().replace("CONTAINER_ID", cid))
    return doc


def docker_state(root: Path, doc: dict[str, Any], cid: str = ID) -> Path:
    """config.v2.json as dockerd writes it: one line of compact JSON, replaced atomically."""
    path = root / "docker" / "containers" / cid / "config.v2.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, separators=(",", ":")) + "\n")
    os.replace(tmp, path)
    return path


def bundle(root: Path, doc: dict[str, Any], namespace: str = "k8s.io", cid: str = ID) -> Path:
    path = root / "containerd" / "io.containerd.runtime.v2.task" / namespace / cid / "config.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, separators=(",", ":")))
    return path


def directory(root: Path, **kwargs: Any) -> ContainerDirectory:
    return ContainerDirectory(str(root / "docker"), str(root / "containerd"), **kwargs)


@pytest.mark.parametrize(
    ("cgroup", "where"),
    [
        (DOCKER_SCOPE, Location("docker", ID)),
        (f"0::/system.slice/docker-{ID}.scope/init.scope\n", Location("docker", ID)),  # systemd inside it
        (f"12:pids:/docker/{ID}\n1:name=systemd:/docker/{ID}\n", Location("docker", ID)),  # cgroup v1
        (f"0::/ecs/{'a' * 32}/{ID}\n", Location("docker", ID)),
        (CRI_SCOPE, Location("containerd", ID)),
        (f"0::/kubepods.slice/kubepods-pod{POD_UID}.slice/crio-{ID}.scope\n", Location("cri-o", ID)),
        (f"0::/machine.slice/libpod-{ID}.scope/container\n", Location("podman", ID)),
        (f"0::/kubepods/burstable/pod{POD_UID.replace('_', '-')}/{ID}\n", Location("", ID)),  # any CRI runtime
        ("0::/default/web\n", Location("containerd", "web", "default")),  # ctr run
    ],
)
def test_the_runtimes_layouts_are_recognised(cgroup: str, where: Location) -> None:
    assert locate(cgroup, ("default",)) == where


@pytest.mark.parametrize(
    "cgroup",
    [
        # A user's delegated tree can hold a cgroup of any name: it must not pass for root's container.
        f"0::/user.slice/user-1000.slice/user@1000.service/app.slice/docker-{ID}.scope\n",
        f"0::/system.slice/app.service/docker-{ID}.scope\n",  # a service with Delegate=yes
        f"0::/home/docker/{ID}\n",
        "0::/system.slice/docker.service\n",
        "0::/other/web\n",  # not a containerd namespace the agent was told of
        "0::/default/..\n",
        "0::/default/a..b\n",
        "",
    ],
)
def test_paths_outside_the_layouts_are_no_container(cgroup: str) -> None:
    assert locate(cgroup, ("default",)) is None


def test_a_container_that_names_a_child_cgroup_after_another_stays_itself() -> None:
    nested = f"0::/system.slice/docker-{ID}.scope/x.slice/docker-{OTHER}.scope\n"
    assert locate(nested) == Location("docker", ID)
    assert locate(f"0::/docker/{ID}/docker/{OTHER}\n") == Location("docker", ID)


def test_docker_name_image_and_sorted_labels(tmp_path: Path) -> None:
    docker_state(tmp_path, fixture("docker-config.v2.json"))
    found = directory(tmp_path).lookup(ID, DOCKER_SCOPE)
    assert found.reason == "" and found.read
    info = found.info
    assert info is not None
    assert (info.id, info.runtime, info.name, info.image) == (ID, "docker", "web", "docker.io/library/nginx:1.25")
    assert [k for k, _ in info.labels] == ["com.docker.compose.project", "maintainer", "team"]
    assert info.label("team") == "billing" and info.label("absent") is None
    assert (info.pod_namespace, info.pod_name, info.service_account) == ("", "", "")


def test_dockershim_labels_fill_the_pod_only_for_the_name_dockershim_gives(tmp_path: Path) -> None:
    doc = fixture("docker-config.v2.json")
    labels = {"io.kubernetes.pod.namespace": "payments", "io.kubernetes.pod.name": "exporter-7d9f8b6c5-x2x7q",
              "io.kubernetes.container.name": "exporter", "io.kubernetes.docker.type": "container"}  # fmt: skip
    doc["Config"]["Labels"].update(labels)
    doc["Name"] = "/k8s_exporter_exporter-7d9f8b6c5-x2x7q_payments_3f5e1f9c-5a0b-4f4e-9d8e-2b7c1a6d0e11_0"
    docker_state(tmp_path, doc)
    info = directory(tmp_path).describe(ID, DOCKER_SCOPE)
    assert info is not None
    assert (info.name, info.pod_namespace, info.pod_name) == ("exporter", "payments", "exporter-7d9f8b6c5-x2x7q")
    # The same labels on a container started by hand (or declared by its image) claim nothing.
    doc["Name"] = "/web"
    docker_state(tmp_path, doc)
    info = directory(tmp_path).describe(ID, DOCKER_SCOPE)
    assert info is not None and (info.name, info.pod_namespace, info.pod_name) == ("web", "", "")


def test_containerd_cri_annotations_describe_the_pod_but_never_its_service_account(tmp_path: Path) -> None:
    bundle(tmp_path, fixture("containerd-cri-config.json"))
    info = directory(tmp_path).describe(None, CRI_SCOPE)
    assert info is not None
    assert (info.runtime, info.name, info.pod_namespace, info.pod_name) == (
        "containerd",
        "exporter",
        "payments",
        "exporter-7d9f8b6c5-x2x7q",
    )
    assert info.image == "123456789012.dkr.ecr.us-east-1.amazonaws.com/payments/exporter:1.4.2"
    assert info.label("io.kubernetes.cri.container-type") == "container"
    # The bundle mounts the service account's token; the token would name the account, but it is a credential.
    assert info.service_account == ""


def test_a_ctr_container_is_its_id_without_an_image(tmp_path: Path) -> None:
    bundle(tmp_path, fixture("containerd-ctr-config.json"), namespace="default", cid="web")
    info = directory(tmp_path).describe(None, "0::/default/web\n")
    assert info == ContainerInfo("web", "containerd", "web")
    assert directory(tmp_path, containerd_namespaces=()).describe(None, "0::/default/web\n") is None


def test_the_cgroupfs_kubepods_layout_is_whichever_runtime_has_the_state(tmp_path: Path) -> None:
    cgroup = f"0::/kubepods/besteffort/pod{POD_UID.replace('_', '-')}/{ID}\n"
    found = directory(tmp_path).lookup(ID, cgroup)
    assert found.info == ContainerInfo(ID, "unknown") and "no runtime's state" in found.reason
    docker_state(tmp_path, fixture("docker-config.v2.json"))
    info = directory(tmp_path).describe(ID, cgroup)
    assert info is not None and info.runtime == "docker"


def test_cri_o_and_podman_are_named_but_not_read(tmp_path: Path) -> None:
    found = directory(tmp_path).lookup(None, f"0::/machine.slice/libpod-{ID}.scope\n")
    assert found.info == ContainerInfo(ID, "podman") and "not read" in found.reason


def test_the_id_found_elsewhere_must_be_the_one_the_layout_names(tmp_path: Path) -> None:
    docker_state(tmp_path, fixture("docker-config.v2.json"))
    found = directory(tmp_path).lookup(OTHER, DOCKER_SCOPE)
    assert found.info is None and "names container 4c01db0b339c" in found.reason
    assert directory(tmp_path).lookup(None, "0::/user.slice/x.scope\n") == containers.Described(None)


def test_missing_malformed_or_foreign_state_is_no_information_with_a_reason(tmp_path: Path) -> None:
    d = directory(tmp_path)
    found = d.lookup(ID, DOCKER_SCOPE)
    assert found.info == ContainerInfo(ID, "docker") and "no state at" in found.reason
    path = docker_state(tmp_path, fixture("docker-config.v2.json"))
    path.write_text('{"ID": "' + ID + '", "Config": {"Image": "nginx"')  # cut short
    found = d.lookup(ID, DOCKER_SCOPE)
    assert found.info == ContainerInfo(ID, "docker") and "is not JSON" in found.reason
    docker_state(tmp_path, fixture("docker-config.v2.json", cid=OTHER), cid=ID)  # another container's state
    assert "does not describe this container" in d.lookup(ID, DOCKER_SCOPE).reason
    docker_state(tmp_path, {"ID": ID, "Config": {"Image": ["not", "a", "string"], "Labels": "x"}, "Name": 7})
    assert d.describe(ID, DOCKER_SCOPE) == ContainerInfo(ID, "docker")


def test_reads_are_capped_and_never_block_or_follow_links(tmp_path: Path) -> None:
    doc = fixture("docker-config.v2.json")
    doc["Config"]["Labels"]["padding"] = "x" * 4096
    path = docker_state(tmp_path, doc)
    found = directory(tmp_path, max_bytes=4096).lookup(ID, DOCKER_SCOPE)
    assert found.info == ContainerInfo(ID, "docker") and "over 4096 bytes" in found.reason
    path.unlink()
    os.mkfifo(path)  # opening a FIFO for reading would wait for a writer
    assert "not a regular file" in directory(tmp_path).lookup(ID, DOCKER_SCOPE).reason
    path.unlink()
    real = docker_state(tmp_path, fixture("docker-config.v2.json"), cid=OTHER)
    path.symlink_to(real)
    assert "cannot open" in directory(tmp_path).lookup(ID, DOCKER_SCOPE).reason


def test_labels_over_the_caps_are_left_out_not_cut(tmp_path: Path) -> None:
    doc = fixture("docker-config.v2.json")
    doc["Config"]["Labels"] = {f"k{n:03d}": "v" for n in range(containers.MAX_LABELS + 5)}
    doc["Config"]["Labels"]["team"] = "billing" + "x" * containers.MAX_LABEL_VALUE
    docker_state(tmp_path, doc)
    found = directory(tmp_path).lookup(ID, DOCKER_SCOPE)
    assert found.info is not None and len(found.info.labels) == containers.MAX_LABELS
    assert found.info.label("team") is None and "6 labels left out" in found.reason


def test_descriptions_are_cached_until_the_state_file_changes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    reads: list[str] = []
    real = containers._read_json

    def counting(path: str, limit: int) -> Any:
        reads.append(path)
        return real(path, limit)

    monkeypatch.setattr(containers, "_read_json", counting)
    d = directory(tmp_path, cache_size=2)
    doc = fixture("docker-config.v2.json")
    docker_state(tmp_path, doc)
    first = d.describe(ID, DOCKER_SCOPE)
    assert d.describe(ID, DOCKER_SCOPE) is first and len(reads) == 1
    doc["Name"] = "/renamed"  # docker rename rewrites the file (a new inode)
    docker_state(tmp_path, doc)
    renamed = d.describe(ID, DOCKER_SCOPE)
    assert renamed is not None and renamed.name == "renamed" and len(reads) == 2
    for n in range(3):  # the cache holds two: the first is forgotten
        cid = f"{n}" * 64
        docker_state(tmp_path, fixture("docker-config.v2.json", cid=cid), cid=cid)
        d.describe(cid, f"0::/docker/{cid}\n")
    assert len(d._cache) == 2


@pytest.mark.parametrize(
    ("uid_map", "host_uid", "inside"),
    [
        ("         0          0 4294967295\n", 1000, 1000),  # no user namespace: the identity
        ("         0     100000      65536\n", 100000, 0),  # a remapped root
        ("         0     100000      65536\n", 101000, 1000),
        ("         0       1000          1\n         1     100000      65536\n", 100001, 2),
        ("         0     100000      65536\n", 1000, None),  # not mapped: the overflow uid inside
        ("garbage\n0 x 1\n", 0, None),
        ("", 0, None),
    ],
)
def test_uid_inside_reads_the_map_as_the_host_sees_it(uid_map: str, host_uid: int, inside: int | None) -> None:
    assert uid_inside(uid_map, host_uid) == inside


@pytest.mark.parametrize(
    ("ref", "full"),
    [
        ("nginx", "docker.io/library/nginx:latest"),
        ("nginx:1.25", "docker.io/library/nginx:1.25"),
        ("library/nginx", "docker.io/library/nginx:latest"),
        ("bitnami/redis:7", "docker.io/bitnami/redis:7"),
        ("index.docker.io/nginx", "docker.io/library/nginx:latest"),
        ("localhost/app", "localhost/app:latest"),
        ("registry:5000/app", "registry:5000/app:latest"),
        ("public.ecr.aws/eks/aws-node:v1.18.0", "public.ecr.aws/eks/aws-node:v1.18.0"),
        ("nginx@sha256:" + "ab" * 32, "docker.io/library/nginx@sha256:" + "ab" * 32),
        ("sha256:" + "ab" * 32, "sha256:" + "ab" * 32),  # `docker run <image id>`
        ("", ""),
    ],
)
def test_image_references_are_written_out_in_full(ref: str, full: str) -> None:
    assert normalize_image(ref) == full


def test_a_description_escapes_what_the_container_chose() -> None:
    info = ContainerInfo(ID, "docker", "web\nforged line", "docker.io/x/y:1\x1b[2J", pod_namespace="p", pod_name="q")
    text = describe_workload(info, uid=0)
    assert "\n" not in text and "\x1b" not in text
    assert text == ("docker container 4c01db0b339c, name web\\nforged line, image docker.io/x/y:1\\x1b[2J, pod p/q, "
                    "uid 0 inside")  # fmt: skip
