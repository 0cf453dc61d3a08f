"""Policy files: sorted drop-ins load into rules; each bad file is refused naming file, line and key."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from imds_agent.errors import ConfigError
from imds_agent.policy.loader import load_policy

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
