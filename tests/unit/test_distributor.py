"""The SSM Distributor package built by packaging/distributor/build.py, from fake package files: manifest keys and
checksums, zip contents and script modes, reproducibility."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import stat
import zipfile
from pathlib import Path
from types import ModuleType

import pytest

BUILD = Path(__file__).parents[2] / "packaging" / "distributor" / "build.py"


def builder() -> ModuleType:
    spec = importlib.util.spec_from_file_location("distributor_build", BUILD)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def packages(tmp_path: Path) -> dict[str, str]:
    deb, rpm = tmp_path / "imds-agent_0.1.0_all.deb", tmp_path / "imds-agent-0.1.0-1.noarch.rpm"
    deb.write_bytes(b"!<arch>\nfake deb")
    rpm.write_bytes(b"\xed\xab\xee\xdb fake rpm")
    return {"deb": str(deb), "rpm": str(rpm)}


def test_manifest_maps_each_supported_platform_to_its_zip(tmp_path: Path, packages: dict[str, str]) -> None:
    out = tmp_path / "distributor"
    path = builder().build(packages, str(out), "0.1.0")
    doc = json.loads(Path(path).read_text())
    assert set(doc) == {"schemaVersion", "version", "publisher", "packages", "files"}
    assert doc["schemaVersion"] == "2.0" and doc["version"] == "0.1.0" and doc["publisher"]
    expect = {
        "ubuntu": ("22.04", "24.04", "deb"),
        "debian": ("12", "deb"),
        "amazon": ("2023", "rpm"),
        "redhat": ("9", "rpm"),
    }
    assert set(doc["packages"]) == set(expect)
    for platform, (*versions, kind) in expect.items():
        assert set(doc["packages"][platform]) == set(versions)
        for archs in doc["packages"][platform].values():
            assert archs == {a: {"file": f"imds-agent-0.1.0-{kind}.zip"} for a in ("x86_64", "arm64")}
    # Every zip a platform names is listed in files with its sha256, and nothing else is.
    named = {f["file"] for p in doc["packages"].values() for v in p.values() for f in v.values()}
    assert set(doc["files"]) == named == {p.name for p in out.glob("*.zip")}
    for name, entry in doc["files"].items():
        assert entry == {"checksums": {"sha256": hashlib.sha256((out / name).read_bytes()).hexdigest()}}


def test_each_zip_holds_the_scripts_and_its_package(tmp_path: Path, packages: dict[str, str]) -> None:
    out = tmp_path / "distributor"
    builder().build(packages, str(out), "0.1.0")
    for kind, package in packages.items():
        with zipfile.ZipFile(out / f"imds-agent-0.1.0-{kind}.zip") as zf:
            assert zf.testzip() is None
            names = zf.namelist()
            assert names == ["install.sh", "uninstall.sh", "update.sh", Path(package).name]
            assert zf.read(Path(package).name) == Path(package).read_bytes()
            for info in zf.infolist():
                mode = info.external_attr >> 16
                assert stat.S_ISREG(mode) and info.create_system == 3
                want = 0o755 if info.filename.endswith(".sh") else 0o644
                assert stat.S_IMODE(mode) == want, info.filename
            for script in ("install.sh", "uninstall.sh", "update.sh"):
                text = zf.read(script).decode()
                assert text.startswith("#!/bin/sh\n") and "set -eu" in text and "export PATH=" in text


def test_the_scripts_handle_both_package_kinds() -> None:
    scripts = BUILD.parent
    install, update = (scripts / "install.sh").read_text(), (scripts / "update.sh").read_text()
    assert "*.deb" in install and "*.rpm" in install and 'cd "$(dirname "$0")"' in install
    assert "rpm -U" in install and "dpkg -i" in install  # in place: an upgrade, never remove then install
    assert 'exec /bin/sh "$(dirname "$0")/install.sh"' in update and "rpm -e" not in update
    uninstall = (scripts / "uninstall.sh").read_text()
    assert uninstall.index("rules remove") < uninstall.index("dpkg -r") and "rpm -e" in uninstall


def test_builds_are_reproducible(tmp_path: Path, packages: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    b = builder()
    first = Path(b.build(packages, str(tmp_path / "a"), "0.1.0")).read_text()
    second = Path(b.build(packages, str(tmp_path / "b"), "0.1.0")).read_text()
    assert first == second
    with zipfile.ZipFile(tmp_path / "a" / "imds-agent-0.1.0-deb.zip") as zf:
        assert zf.infolist()[0].date_time == (2023, 11, 14, 22, 13, 20)


def test_bad_inputs_are_refused(tmp_path: Path, packages: dict[str, str]) -> None:
    b = builder()
    with pytest.raises(ValueError):
        b.build(packages, str(tmp_path), "0.1.0; rm")
    with pytest.raises(ValueError):
        b.build({"msi": packages["deb"]}, str(tmp_path), "0.1.0")
    assert b.version_of(packages["deb"]) == b.version_of(packages["rpm"]) == "0.1.0"


def test_main_takes_the_version_from_the_package_names(
    tmp_path: Path, packages: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    b = builder()
    out = tmp_path / "out"
    assert b.main(["--deb", packages["deb"], "--rpm", packages["rpm"], "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out / "manifest.json")
    other = tmp_path / "imds-agent-0.2.0-1.noarch.rpm"
    other.write_bytes(b"x")
    assert b.main(["--deb", packages["deb"], "--rpm", str(other), "--out", str(out)]) == 2
