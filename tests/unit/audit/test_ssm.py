"""SSM custom inventory files: valid for the SSM Agent's gatherer and the PutInventory API, bounded, atomic, and
nothing at all where the SSM Agent keeps no inventory."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import pytest

from imds_agent.audit import ssm
from imds_agent.audit.inventory import Entry

INSTANCE = "i-0123456789abcdef0"


def validate(doc: Any) -> None:
    """The rules the gatherer (customGatherer.go) and PutInventory (InventoryItem) apply, written out again here
    rather than taken from the module, so that a wrong constant there fails here."""
    assert isinstance(doc, dict) and {"SchemaVersion", "TypeName", "Content"} <= set(doc)
    assert re.fullmatch(r"([0-9]{1,6})(\.[0-9]{1,6})", doc["SchemaVersion"])
    assert doc["TypeName"].startswith("Custom:") and 1 <= len(doc["TypeName"]) <= 100
    content = doc["Content"]
    entries = content if isinstance(content, list) else [content]
    assert len(entries) <= 10000
    for entry in entries:
        assert isinstance(entry, dict) and len(entry) <= 50
        for name, value in entry.items():
            assert 1 <= len(name) <= 64, name
            assert isinstance(value, str), (name, value)  # only strings: no numbers, booleans or null
            assert len(value.encode("utf-8")) <= 4096, name
    assert len(json.dumps(doc).encode()) <= 200 * 1024  # per type, before SSM Agent 3.x raised its own limit


def entry(exe: str = "/usr/bin/curl", decision: str = "allow", imds: str = "v2", last: float = 1.7e9,
          uid: int | None = 1000, count: int = 1) -> Entry:  # fmt: skip
    user = "app" if uid is not None else None
    return Entry(exe, uid, user, "meta-data/placement", imds, decision, count, 1.6e9, last)


STATUS = ssm.AgentStatus("0.1.0", "audit", "nftables", "ab" * 32, would_deny=3)


def ssm_root(tmp_path: Path) -> Path:
    (tmp_path / INSTANCE / "inventory").mkdir(parents=True)
    return tmp_path


def read(folder: str, name: str) -> Any:
    return json.loads(Path(folder, name).read_text())


def test_both_files_are_valid_custom_inventory(tmp_path: Path) -> None:
    entries = [entry(), entry("/usr/bin/python3", "would-deny", "v1", uid=None), entry("/opt/\udcffbad", "deny")]
    folder = ssm.write_custom_inventory(entries, STATUS, str(ssm_root(tmp_path)))
    assert folder == str(tmp_path / INSTANCE / "inventory" / "custom")
    callers, status = read(folder, ssm.CALLERS_FILE), read(folder, ssm.STATUS_FILE)
    validate(callers)
    validate(status)
    assert callers["TypeName"] == "Custom:ImdsAgentCallers" and status["TypeName"] == "Custom:ImdsAgentStatus"
    assert [c["Decision"] for c in callers["Content"]] == ["deny", "would-deny", "allow"]
    assert callers["Content"][0]["Exe"] == "/opt/\\xffbad"  # undecodable bytes shown, never invalid UTF-8
    python = callers["Content"][1]
    assert python == {"Exe": "/usr/bin/python3", "Uid": "", "User": "", "ExeVerified": "true", "Imds": "v1",
                      "PathClass": "meta-data/placement", "Decision": "would-deny", "Requests": "1",
                      "LastSeen": "2023-11-14T22:13:20Z", "Image": "", "Container": "", "PodNamespace": ""}  # fmt: skip
    assert status["Content"] == [{"Version": "0.1.0", "Mode": "audit", "Backend": "nftables", "PolicyHash": "ab" * 32,
                                  "WouldDeny": "3", "Denied": "0", "Callers": "3", "CallersReported": "3"}]  # fmt: skip


def test_callers_are_bounded_denials_first_then_imdsv1_then_most_recent(tmp_path: Path) -> None:
    many = [entry(f"/opt/app{i}", last=1.7e9 + i) for i in range(3000)]
    many += [entry("/opt/old-v1", imds="v1", last=1.0e9), entry("/opt/denied", "deny", last=1.0e9)]
    many += [entry("/opt/would", "would-deny", last=1.0e9)]
    folder = ssm.write_custom_inventory(many, STATUS, str(ssm_root(tmp_path)))
    assert folder is not None
    callers = read(folder, ssm.CALLERS_FILE)
    validate(callers)
    content = callers["Content"]
    assert len(content) <= ssm.MAX_CALLERS and len(Path(folder, ssm.CALLERS_FILE).read_bytes()) <= ssm.MAX_TYPE_BYTES
    assert [c["Exe"] for c in content[:4]] == ["/opt/denied", "/opt/would", "/opt/old-v1", "/opt/app2999"]
    assert read(folder, ssm.STATUS_FILE)["Content"][0]["CallersReported"] == str(len(content))


def test_long_values_are_cut_to_the_limits(tmp_path: Path) -> None:
    long_exe = "/opt/" + "é" * 5000
    folder = ssm.write_custom_inventory([entry(long_exe)], STATUS, str(ssm_root(tmp_path)))
    assert folder is not None
    callers = read(folder, ssm.CALLERS_FILE)
    validate(callers)
    assert callers["Content"][0]["Exe"].endswith("...")


def test_the_byte_budget_holds_for_the_longest_entries() -> None:
    longest = [entry("/" + "x" * 5000 + str(i), "would-deny") for i in range(400)]
    chosen = ssm.select_callers(longest)
    doc = {"SchemaVersion": "1.0", "TypeName": ssm.CALLERS_TYPE, "Content": chosen}
    validate(doc)
    assert 0 < len(chosen) < 400 and len(json.dumps(doc, separators=(",", ":")).encode()) <= ssm.MAX_TYPE_BYTES


def test_nothing_happens_without_an_ssm_agent_inventory(tmp_path: Path) -> None:
    assert ssm.write_custom_inventory([entry()], STATUS, str(tmp_path / "absent")) is None
    (tmp_path / INSTANCE).mkdir()  # an instance directory, but the agent keeps no inventory there
    (tmp_path / "not-an-instance" / "inventory").mkdir(parents=True)
    assert ssm.write_custom_inventory([entry()], STATUS, str(tmp_path)) is None
    assert ssm.write_custom_inventory([entry()], STATUS, str(tmp_path), instance_id="../etc") is None
    assert sorted(p.name for p in tmp_path.rglob("*")) == [INSTANCE, "inventory", "not-an-instance"]


def test_the_instance_directory_is_found_or_given(tmp_path: Path) -> None:
    root = ssm_root(tmp_path)
    old = root / "i-0aaaaaaaaaaaaaaaa" / "inventory"
    old.mkdir(parents=True)
    os.utime(old, (1, 1))  # an image's leftover from the instance it was made on
    assert ssm.find_instance_id(str(root)) == INSTANCE
    folder = ssm.write_custom_inventory([entry()], STATUS, str(root), instance_id="i-0aaaaaaaaaaaaaaaa")
    assert folder == str(old / "custom")


def test_files_are_replaced_atomically_and_only_if_changed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = str(ssm_root(tmp_path))
    folder = ssm.write_custom_inventory([entry()], STATUS, root)
    assert folder is not None
    path = Path(folder, ssm.CALLERS_FILE)
    inode = path.stat().st_ino
    assert path.stat().st_mode & 0o777 == 0o644  # the SSM Agent reads it whatever its user
    assert ssm.write_custom_inventory([entry()], STATUS, root) == folder
    assert path.stat().st_ino == inode  # same content: not rewritten
    ssm.write_custom_inventory([entry(count=2)], STATUS, root)
    assert path.stat().st_ino != inode and json.loads(path.read_text())["Content"][0]["Requests"] == "2"

    before = path.read_text()

    def fail(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(OSError):
        ssm.write_custom_inventory([entry(count=3)], STATUS, root)
    assert path.read_text() == before  # the gatherer still reads the whole old file
    assert sorted(p.name for p in Path(folder).iterdir()) == [ssm.CALLERS_FILE, ssm.STATUS_FILE]  # no temporary


def test_an_operators_custom_inventory_is_never_pushed_past_twenty_files(tmp_path: Path) -> None:
    custom = ssm_root(tmp_path) / INSTANCE / "inventory" / "custom"
    custom.mkdir()
    for i in range(19):
        (custom / f"Site{i}.json").write_text("{}")
    assert ssm.write_custom_inventory([entry()], STATUS, str(tmp_path)) is None
    assert len(list(custom.glob("*.json"))) == 19
    (custom / "Site0.json").unlink()
    assert ssm.write_custom_inventory([entry()], STATUS, str(tmp_path)) == str(custom)
    assert len(list(custom.glob("*.json"))) == 20
    assert ssm.write_custom_inventory([entry(count=5)], STATUS, str(tmp_path)) == str(custom)  # ours count once


def test_policy_hash_follows_the_files_and_the_settings(tmp_path: Path) -> None:
    a, b = tmp_path / "10-a.yaml", tmp_path / "20-b.yaml"
    a.write_text("rules: []\n")
    b.write_text("rules: []\n")
    first = ssm.policy_hash([str(a), str(b)], "allow-nonsensitive", "deny")
    assert re.fullmatch(r"[0-9a-f]{64}", first)
    assert ssm.policy_hash([str(a), str(b)], "allow-nonsensitive", "deny") == first
    assert ssm.policy_hash([str(a), str(b)], "deny", "deny") != first
    assert ssm.policy_hash([str(a)], "allow-nonsensitive", "deny") != first
    b.write_text("rules: [] # edited\n")
    assert ssm.policy_hash([str(a), str(b)], "allow-nonsensitive", "deny") != first


def test_status_refuses_what_it_cannot_say() -> None:
    with pytest.raises(ValueError):
        ssm.AgentStatus("0.1.0", "permissive", "nftables", "")
    with pytest.raises(ValueError):
        ssm.AgentStatus("0.1.0", "audit", "nftables", "", would_deny=-1)


def test_main_writes_from_the_saved_inventory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state, policy = tmp_path / "state", tmp_path / "policy.d"
    state.mkdir()
    policy.mkdir()
    (policy / "10-site.yaml").write_text("rules: []\n")
    rows = [vars(entry("/usr/bin/curl", "would-deny", "v1", count=4)), vars(entry("/usr/bin/aws"))]
    (state / "inventory.json").write_text(json.dumps({"version": 1, "entries": rows}))
    config = tmp_path / "agent.yaml"
    config.write_text(f"mode: enforce\npolicy:\n  dir: {policy}\naudit:\n  state_dir: {state}\n")
    root = ssm_root(tmp_path / "ssm")
    custom = root / INSTANCE / "inventory" / "custom"
    custom.mkdir()
    # The running agent wrote its real backend before; the configuration only says auto.
    (custom / ssm.STATUS_FILE).write_text(json.dumps({"Content": [{"Backend": "iptables"}]}))
    assert ssm.main(["--config", str(config), "--ssm-root", str(root)]) == 0
    assert "wrote Custom:ImdsAgentCallers" in capsys.readouterr().out
    status = read(str(custom), ssm.STATUS_FILE)["Content"][0]
    said = (status["Mode"], status["Backend"], status["WouldDeny"], status["Callers"])
    assert said == ("enforce", "iptables", "4", "2")
    assert status["PolicyHash"] == ssm.policy_hash([str(policy / "10-site.yaml")], "allow-nonsensitive", "deny")
    validate(read(str(custom), ssm.CALLERS_FILE))

    assert ssm.main(["--config", str(config), "--ssm-root", str(tmp_path / "none")]) == 0
    assert "nothing written" in capsys.readouterr().out
    (state / "inventory.json").write_text("garbage")
    assert ssm.main(["--config", str(config), "--ssm-root", str(root)]) == 78
    assert "cannot read the inventory" in capsys.readouterr().err


def test_a_container_callers_entry_names_its_image_and_pod_namespace() -> None:
    from imds_agent.audit.ssm import caller_entry

    entry = Entry(exe="/usr/bin/curl", uid=0, user="root", imds="v1", path_class="credentials", decision="deny",
                  count=3, first_seen=1.0, last_seen=1.0, exe_verified=False, image="docker.io/library/app:1",
                  container="web", pod_namespace="payments")  # fmt: skip
    got = caller_entry(entry)
    assert (got["Image"], got["Container"], got["PodNamespace"]) == ("docker.io/library/app:1", "web", "payments")
    assert all(isinstance(v, str) for v in got.values())
