"""Policy files: sorted drop-ins load into rules; each bad file is refused naming file, line and key."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from imds_agent.errors import ConfigError
from imds_agent.policy.loader import load_policy
from imds_agent.policy.model import ANY_EXE, WorkloadPattern

DATA = Path(__file__).parent / "data"


def test_good_directory_loads_in_sorted_order() -> None:
    policy = load_policy(str(DATA / "good"), default="deny")
    assert [os.path.basename(f) for f in policy.files] == ["10-ssm.yaml", "20-app.yml", "30-empty.yaml"]
    ssm, app = policy.rules
    assert ssm.name == "amazon-ssm-agent" and ssm.uids == (0,)
    assert set(ssm.sensitive) == {"credentials", "identity-credentials", "user-data"}
    assert ssm.source.endswith("10-ssm.yaml:3")
    assert app.name == "20-app.yml#1" and app.users == ("app", "deploy") and not app.inject_token
    assert policy.default == "deny"


def test_missing_directory_is_an_empty_policy(tmp_path: Path) -> None:
    assert load_policy(str(tmp_path / "absent")).rules == ()


@pytest.mark.parametrize(
    ("name", "line", "key", "text"),
    [
        ("sensitive.yaml", 4, "rules[0].sensitive", "unknown class 'passwords'"),
        ("relative-exe.yaml", 3, "rules[0].exe", "absolute path"),
        ("uid.yaml", 4, "rules[0].uid", "integer"),
        ("typo.yaml", 4, "rules[0].alow", "unknown key"),
        ("no-exe.yaml", 4, "rules[1]", "needs 'exe'"),
        ("duplicate.yaml", 4, "rules[0].name", "duplicate key"),
        ("syntax.yaml", None, None, "invalid YAML"),
        ("top-key.yaml", 1, "rule", "unknown key"),
        ("sha.yaml", 3, "rules[0].sha256", "64 hexadecimal"),
        ("in-containers.yaml", 4, "rules[0].in_containers", "true or false"),
        ("refuse-preload.yaml", 4, "rules[0].refuse_preload", "true or false"),
        ("container-empty.yaml", 4, "rules[0].container", "at least one of: image, name, labels, runtime"),
        ("container-key.yaml", 4, "rules[0].container.imgae", "unknown key (allowed: image, name, labels, runtime)"),
        ("pod-key.yaml", 5, "rules[0].pod.serviceaccount", "unknown key (allowed: namespace, name, service_account)"),
        ("pod-list.yaml", 4, "rules[0].pod", "must be a mapping"),
        ("container-image.yaml", 4, "rules[0].container.image", "full reference, registry first"),
        ("container-runtime.yaml", 4, "rules[0].container.runtime", "unknown runtime 'dockerd'"),
        ("container-label.yaml", 5, "rules[0].container.labels.team", "quote it"),
        ("container-in-containers.yaml", 4, "rules[0].in_containers", "drop in_containers"),
    ],
)
def test_bad_files_name_file_line_and_key(
    tmp_path: Path, name: str, line: int | None, key: str | None, text: str
) -> None:
    shutil.copy(DATA / "good" / "10-ssm.yaml", tmp_path / "10-ssm.yaml")
    shutil.copy(DATA / "bad" / name, tmp_path / f"50-{name}")
    with pytest.raises(ConfigError) as info:
        load_policy(str(tmp_path))
    err = info.value
    assert err.path == str(tmp_path / f"50-{name}")
    if line is not None:
        assert err.line == line
    assert err.key == key
    assert text in str(err)


def test_a_container_or_pod_rule_needs_no_exe_and_keeps_its_globs(tmp_path: Path) -> None:
    (tmp_path / "50-web.yaml").write_text(
        "rules:\n"
        "  - name: web\n"
        '    container: {image: "registry.example.com/billing/*:*", name: "web-*", labels: {team: billing}, '
        "runtime: docker}\n"
        '    pod: {namespace: payments, name: "exporter-*", service_account: exporter}\n'
        "  - name: any-image\n"
        '    exe: ["/app/*"]\n'
        '    container: {image: "**"}\n'
    )
    web, anything = load_policy(str(tmp_path)).rules
    assert web.exe == ANY_EXE and web.workload == WorkloadPattern(
        image="registry.example.com/billing/*:*",
        name="web-*",
        runtime="docker",
        labels=(("team", "billing"),),
        pod_namespace="payments",
        pod_name="exporter-*",
        service_account="exporter",
    )
    assert web.source.endswith("50-web.yaml:2")
    assert anything.exe == ("/app/*",) and anything.workload == WorkloadPattern(image="**")
