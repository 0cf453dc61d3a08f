"""The SSM documents (Run Command, and State Manager's Ensure): schema 2.2 shape, parameters constrained, every
reference declared; what the Inventory and Ensure steps run."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

SSM = Path(__file__).parents[2] / "packaging" / "ssm"
DOCS = sorted(SSM.glob("*.json"))
REF = re.compile(r"\{\{\s*([A-Za-z0-9]+)\s*\}\}")


def test_the_documents_exist() -> None:
    assert [d.stem for d in DOCS] == [
        "ImdsAgent-Ensure",
        "ImdsAgent-Install",
        "ImdsAgent-Inventory",
        "ImdsAgent-Report",
        "ImdsAgent-SetMode",
        "ImdsAgent-Uninstall",
    ]


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.stem)
def test_document_structure(path: Path) -> None:
    doc = json.loads(path.read_text())
    assert doc["schemaVersion"] == "2.2" and doc["description"]
    assert set(doc) <= {"schemaVersion", "description", "parameters", "mainSteps"}
    doc.setdefault("parameters", {})
    names = set()
    for step in doc["mainSteps"]:
        assert step["action"] == "aws:runShellScript"
        assert re.fullmatch(r"[A-Za-z0-9_.-]{1,100}", step["name"]) and step["name"] not in names
        names.add(step["name"])
        commands = step["inputs"]["runCommand"]
        assert isinstance(commands, list) and all(isinstance(c, str) for c in commands)
        assert "set -eu" in commands and any(c.startswith("export PATH=") for c in commands)
        used = {m for c in commands for m in REF.findall(c)}
        assert used <= set(doc["parameters"]), f"undeclared: {used - set(doc['parameters'])}"
    for name, param in doc["parameters"].items():
        assert param["type"] == "String" and param["description"]
        # Every value that reaches a shell is constrained: a fixed list or an anchored pattern.
        assert (
            "allowedValues" in param
            or param["allowedPattern"].startswith("^")
            and param["allowedPattern"].endswith("$")
        )
        if "default" in param:
            allowed = param.get("allowedValues")
            assert param["default"] in allowed if allowed else re.match(param["allowedPattern"], param["default"])
        used_somewhere = any(name in c for s in doc["mainSteps"] for c in s["inputs"]["runCommand"])
        assert used_somewhere, f"parameter {name} is never used"


def test_package_source_pattern_refuses_shell_metacharacters() -> None:
    pattern = json.loads((SSM / "ImdsAgent-Install.json").read_text())["parameters"]["PackageSource"]["allowedPattern"]
    for good in ("repo", "s3://my-bucket/pkgs/imds-agent_0.1.0_all.deb", "https://repo.example.com/imds-agent-0.1.0-1.noarch.rpm",
                 "file:///tmp/imds-agent_0.1.0_all.deb"):  # fmt: skip
        assert re.match(pattern, good), good
    for bad in ("s3://b/x.deb;reboot", "https://x/$(id).rpm", "file:///tmp/a b.deb", "ftp://x/y.deb", "s3://b/x.tar"):
        assert not re.match(pattern, bad), bad


def load(name: str) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((SSM / f"ImdsAgent-{name}.json").read_text())
    return doc


def commands(name: str) -> str:
    return "\n".join(load(name)["mainSteps"][0]["inputs"]["runCommand"])


def test_inventory_runs_the_module_that_writes_the_files() -> None:
    doc = load("Inventory")
    assert doc["parameters"] == {} and len(doc["mainSteps"]) == 1
    text = commands("Inventory")
    # The packaged module, on the distribution's Python, without writing byte-code into /usr.
    assert "PYTHONPATH=/usr/share/imds-agent:/usr/share/imds-agent/vendor python3 -B -m imds_agent.audit.ssm" in text


def test_ensure_takes_the_mode_and_where_to_reinstall_from() -> None:
    doc = load("Ensure")
    params = doc["parameters"]
    assert set(params) == {"Mode", "PackageSource"}
    assert params["Mode"]["allowedValues"] == ["audit", "enforce"] and "default" not in params["Mode"]
    install = load("Install")["parameters"]["PackageSource"]
    assert params["PackageSource"]["allowedPattern"] == install["allowedPattern"]
    assert params["PackageSource"]["default"] == "repo"


def test_ensure_corrects_and_reports_each_kind_of_drift() -> None:
    text = commands("Ensure")
    for needed in ("command -v imds-agent", "imds-agent check-config", "imds-agent set-mode \"$mode\"",
                   "systemctl is-enabled", "systemctl start", "systemctl reload", "StatusText"):  # fmt: skip
        assert needed in text, needed
    assert text.count("drifted ") >= 5  # installed, mode in agent.yaml, enabled, running, running mode
    assert "no drift:" in text and "corrected $drift drift(s)" in text
    # An invalid configuration is reported, never overwritten by set-mode.
    assert text.index("check-config") < text.index("set-mode")
