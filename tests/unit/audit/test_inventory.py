"""The inventory: aggregation, persistence across restarts, path classes, concurrent requests, the bound."""

from __future__ import annotations

import dataclasses
import json
import threading
from pathlib import Path
from typing import Any

import pytest

from imds_agent.audit import inventory as inv_mod
from imds_agent.audit.inventory import Inventory, path_class
from imds_agent.errors import ConfigError
from imds_agent.identity.caller import ContainerInfo
from imds_agent.policy.paths import normalize

SEEN = ("/usr/bin/curl", 1000, "app", "credentials", "v1", "would-deny")


def racy_entries(monkeypatch: pytest.MonkeyPatch) -> None:
    """Entries whose count is read, then held until a second reader arrives (or 0.5 s pass): two unlocked
    ``count += 1`` then both read the same value and one increment is lost, every time, whatever the GIL does."""
    rendezvous = threading.Barrier(2, timeout=0.5)

    class RacyEntry(inv_mod.Entry):
        @property
        def count(self) -> int:
            value: int = self.__dict__["count"]
            try:
                rendezvous.wait()
            except threading.BrokenBarrierError:  # alone (the lock held the other out): carry on
                pass
            return value

        @count.setter
        def count(self, value: int) -> None:
            self.__dict__["count"] = value

    monkeypatch.setattr(inv_mod, "Entry", RacyEntry)


def test_concurrent_adds_of_one_entry_lose_no_count(monkeypatch: pytest.MonkeyPatch) -> None:
    racy_entries(monkeypatch)
    inv = Inventory("/nonexistent")
    inv.add(*SEEN, 1.0)
    threads = [threading.Thread(target=inv.add, args=(*SEEN, 2.0 + n)) for n in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(5)
    (entry,) = inv.entries()
    assert (vars(entry)["count"], entry.last_seen) == (3, 3.0)


def add(inv: Inventory, exe: str, when: float) -> bool:
    return inv.add(exe, 1000, "app", "meta-data", "v1", "allow", when)


def exes(inv: Inventory) -> list[str]:
    return [e.exe for e in inv.entries()]


def test_at_the_bound_the_least_recently_seen_is_dropped_and_counted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(inv_mod, "MAX_ENTRIES", 3)
    inv = Inventory("/nonexistent")
    assert all(add(inv, f"/tmp/run-{n}", float(n)) for n in range(3))
    assert inv.evicted == 0
    assert add(inv, "/tmp/run-3", 3.0)
    assert (exes(inv), inv.evicted) == (["/tmp/run-1", "/tmp/run-2", "/tmp/run-3"], 1)


def test_an_entry_seen_again_is_the_most_recent_and_survives(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(inv_mod, "MAX_ENTRIES", 3)
    inv = Inventory("/nonexistent")
    for n in range(3):
        add(inv, f"/tmp/run-{n}", float(n))
    assert not add(inv, "/tmp/run-0", 3.0)  # counted, not new: nothing evicted
    assert inv.evicted == 0
    add(inv, "/tmp/run-3", 4.0)
    add(inv, "/tmp/run-4", 5.0)
    assert (exes(inv), inv.evicted) == (["/tmp/run-0", "/tmp/run-3", "/tmp/run-4"], 2)


def test_an_evicted_entry_seen_again_starts_afresh(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(inv_mod, "MAX_ENTRIES", 1)
    inv = Inventory("/nonexistent")
    add(inv, "/tmp/a", 1.0)
    add(inv, "/tmp/a", 2.0)
    add(inv, "/tmp/b", 3.0)
    assert add(inv, "/tmp/a", 4.0)
    (entry,) = inv.entries()
    got: tuple[Any, ...] = (entry.exe, entry.count, entry.first_seen, inv.evicted)
    assert got == ("/tmp/a", 1, 4.0, 2)


def test_inventory_aggregates_and_survives_a_restart(tmp_path: Path) -> None:
    inv = Inventory(str(tmp_path))
    for when in (100.0, 200.0, 150.0):
        inv.add("/usr/bin/curl", 1000, "app", "credentials", "v1", "would-deny", when)
    inv.add("/usr/bin/curl", 1000, "app", "meta-data/placement", "v2", "allow", 120.0)
    inv.save()
    again = Inventory(str(tmp_path)).load().entries()
    creds = next(e for e in again if e.path_class == "credentials")
    assert (creds.count, creds.first_seen, creds.last_seen) == (3, 100.0, 200.0)
    assert len(again) == 2


def test_corrupt_inventory_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "inventory.json").write_text("{not json")
    with pytest.raises(ConfigError, match="inventory.json"):
        Inventory(str(tmp_path)).load()


def test_path_classes() -> None:
    assert path_class(normalize("/latest/meta-data/placement/region")) == "meta-data/placement"
    assert path_class(normalize("/latest/meta-data/iam/security-credentials/x")) == "credentials"
    assert path_class(normalize("/latest/meta-data/")) == "meta-data"
    assert path_class(normalize("/")) == "/"
    assert path_class(None) == "(invalid path)"


def test_inventories_saved_before_exe_verification_load_as_host_files(tmp_path: Path) -> None:
    old = {"exe": "/usr/bin/curl", "uid": 0, "user": "root", "path_class": "meta-data/placement", "imds": "v1",
           "decision": "allow", "count": 3, "first_seen": 1.0, "last_seen": 2.0}  # fmt: skip
    (tmp_path / "inventory.json").write_text(json.dumps({"version": 1, "entries": [old]}))
    (entry,) = Inventory(str(tmp_path)).load().entries()
    assert entry.exe_verified is True and entry.count == 3


def test_a_loaded_inventory_evicts_by_last_seen_whatever_order_the_file_had(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def entry(exe: str, last: float) -> dict[str, object]:
        return {"exe": exe, "uid": 0, "user": "root", "path_class": "meta-data", "imds": "v1", "decision": "allow",
                "count": 1, "first_seen": 0.0, "last_seen": last}  # fmt: skip

    entries = [entry("/new", 30.0), entry("/old", 10.0), entry("/mid", 20.0)]
    (tmp_path / "inventory.json").write_text(json.dumps({"version": 1, "entries": entries}))
    monkeypatch.setattr(inv_mod, "MAX_ENTRIES", 3)
    inv = Inventory(str(tmp_path)).load()
    inv.add("/newest", 0, "root", "meta-data", "v1", "allow", 40.0)
    assert sorted(e.exe for e in inv.entries()) == ["/mid", "/new", "/newest"]


def test_path_classes_come_from_a_closed_set_whatever_the_path() -> None:
    assert path_class(normalize("/latest/meta-data/placement/region")) == "meta-data/placement"
    assert path_class(normalize("/latest/dynamic/instance-identity/document")) == "dynamic/instance-identity"
    assert path_class(normalize("/latest/meta-data/")) == "meta-data"
    assert path_class(normalize("/latest/meta-data/iam/security-credentials/x")) == "credentials"
    # An attacker minting one class per request gets one class in all.
    minted = {path_class(normalize(f"/latest/meta-data/x{n}/y")) for n in range(500)}
    assert minted == {"(other)"}
    assert path_class(normalize("/latest/meta-data/unknown-key")) == "(other)"


def fill(inv: Inventory, n: int, decision: str, start: float = 0.0) -> None:
    for i in range(n):
        inv.add(f"/tmp/x{decision}{i}", 1000, "app", "meta-data", "v1", decision, start + i)


def test_denials_are_never_evicted_to_make_room(monkeypatch: pytest.MonkeyPatch) -> None:
    """20500 distinct allowed entries used to push every would-deny out, after which report showed 0 would-deny."""
    monkeypatch.setattr(inv_mod, "MAX_ENTRIES", 10)
    inv = Inventory("/nonexistent")
    inv.add("/usr/bin/curl", 1000, "app", "credentials", "v1", "would-deny", 0.0)
    fill(inv, 50, "allow", start=1.0)
    kept = [e for e in inv.entries() if e.decision == "would-deny"]
    assert [(e.exe, e.count) for e in kept] == [("/usr/bin/curl", 1)]
    assert len(inv.entries()) == 10 and inv.evicted == 41


def test_when_only_denials_are_left_new_ones_are_counted_under_the_overflow_entry(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(inv_mod, "MAX_ENTRIES", 3)
    inv = Inventory("/nonexistent")
    fill(inv, 3, "deny")
    fill(inv, 5, "would-deny", start=10.0)
    inv.add("/bin/true", 1000, "app", "meta-data", "v1", "allow", 20.0)  # no room: counted as evicted, not kept
    entries = inv.entries()
    overflow = [e for e in entries if e.exe == inv_mod.OVERFLOW_EXE]
    assert [(e.decision, e.count, e.uid) for e in overflow] == [("would-deny", 5, 1000)]
    assert len(entries) == 4 and inv.overflowed == 5 and inv.evicted == 1


def test_the_bound_counters_survive_a_restart_and_the_report_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from imds_agent.audit.report import bound_note

    monkeypatch.setattr(inv_mod, "MAX_ENTRIES", 2)
    inv = Inventory(str(tmp_path))
    fill(inv, 4, "allow")
    inv.save()
    again = Inventory(str(tmp_path)).load()
    assert again.evicted == 2
    assert "2 entries of allowed or refused requests were dropped" in bound_note(again.evicted, again.overflowed)


@pytest.mark.parametrize(
    "text",
    ["garbage", '{"version": 1, "entries": [{"exe": "/x"', "", "[1, 2]", '{"entries": {"a": 1}}',
     '{"entries": [{"exe": "/x", "nope": 1}]}',
     '{"entries": [{"exe": "/x", "uid": "0", "user": null, "path_class": "/", "imds": "v1", "decision": "allow",'
     ' "count": "many", "first_seen": 1, "last_seen": 2}]}'],
    ids=["garbage", "truncated", "empty", "a-list", "entries-not-a-list", "unknown-field", "wrong-types"],
)  # fmt: skip
def test_a_corrupt_inventory_is_moved_aside_at_start_and_a_fresh_one_begins(
    tmp_path: Path, text: str, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "inventory.json").write_text(text)
    with pytest.raises(ConfigError, match="inventory.json"):
        Inventory(str(tmp_path)).load()  # `report` says so and changes nothing
    assert (tmp_path / "inventory.json").read_text() == text
    inv = Inventory(str(tmp_path)).load(repair=True)
    assert inv.entries() == []
    (aside,) = tmp_path.glob("inventory.json.corrupt-*")
    assert aside.read_text() == text and not (tmp_path / "inventory.json").exists()
    assert caplog.text.count("was corrupt") == 1
    inv.add(*SEEN, 1.0)
    inv.save()
    assert len(Inventory(str(tmp_path)).load().entries()) == 1


WEB = ContainerInfo("ab" * 32, "docker", "web", "docker.io/library/nginx:1.25")


def test_callers_in_containers_are_told_apart_by_image_and_name_and_survive_a_restart(tmp_path: Path) -> None:
    inv = Inventory(str(tmp_path))
    seen = ("/usr/sbin/nginx", 0, "root", "credentials", "v1", "would-deny", 1.0)
    assert inv.add(*seen)  # the host's nginx
    assert inv.add(*seen, exe_verified=False, workload=WEB)
    assert inv.add(*seen, exe_verified=False, workload=dataclasses.replace(WEB, name="web-2"))
    assert inv.add(*seen, exe_verified=False, workload=dataclasses.replace(WEB, image="docker.io/library/nginx:1.26"))
    assert not inv.add(*seen, exe_verified=False, workload=dataclasses.replace(WEB, id="cd" * 32))  # same image, name
    pod = ContainerInfo("ef" * 32, "containerd", "nginx", "docker.io/library/nginx:1.25", pod_namespace="web",
                        pod_name="nginx-5f7d-abcde")  # fmt: skip
    assert inv.add(*seen, exe_verified=False, workload=pod)
    assert not inv.add(*seen, exe_verified=False, workload=dataclasses.replace(pod, pod_name="nginx-5f7d-fghij"))
    inv.save()
    again = {(e.image, e.container, e.pod_namespace): e for e in Inventory(str(tmp_path)).load().entries()}
    assert set(again) == {("", "", ""), ("docker.io/library/nginx:1.25", "web", ""),
                          ("docker.io/library/nginx:1.25", "web-2", ""), ("docker.io/library/nginx:1.26", "web", ""),
                          ("docker.io/library/nginx:1.25", "nginx", "web")}  # fmt: skip
    assert again["docker.io/library/nginx:1.25", "web", ""].count == 2
    assert again["docker.io/library/nginx:1.25", "nginx", "web"].in_container and not again["", "", ""].in_container


def test_a_saved_entry_with_a_container_field_of_the_wrong_type_is_corrupt(tmp_path: Path) -> None:
    bad = {"exe": "/x", "uid": 0, "user": "root", "path_class": "/", "imds": "v1", "decision": "allow", "count": 1,
           "first_seen": 1.0, "last_seen": 2.0, "image": ["not", "a", "string"]}  # fmt: skip
    (tmp_path / "inventory.json").write_text(json.dumps({"version": 1, "entries": [bad]}))
    with pytest.raises(ConfigError, match="wrong types"):
        Inventory(str(tmp_path)).load()
