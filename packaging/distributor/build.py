"""Build the SSM Distributor package of imds-agent: manifest.json and one zip per platform family.

    usage: python3 packaging/distributor/build.py --deb DEB --rpm RPM [--version V] [--out dist/distributor]

Each zip holds install.sh, uninstall.sh, update.sh (Distributor's in-place update) and the package file built by
`make deb` or `make rpm`; the manifest (schema 2.0) maps each platform, version and architecture to its zip and
gives every zip's sha256, which Distributor checks before it runs anything. Only the platforms the packages
support are listed (packaging/README.md: Python 3.9 or newer from the distribution), so Distributor refuses an
Amazon Linux 2 or RHEL 8 host instead of installing an agent that cannot start there. The packages are noarch:
both EC2 architectures get the same zip.

The zips are reproducible: fixed member order and times (SOURCE_DATE_EPOCH, else 1980-01-01), fixed modes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
import time
import zipfile
from collections.abc import Sequence
from typing import Any, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPTS = ("install.sh", "uninstall.sh", "update.sh")
ARCHES = ("x86_64", "arm64")
# Distributor platform names and versions, per package kind.
PLATFORMS: dict[str, dict[str, tuple[str, ...]]] = {
    "deb": {"ubuntu": ("22.04", "24.04"), "debian": ("12",)},
    "rpm": {"amazon": ("2023",), "redhat": ("9",)},
}
PUBLISHER = "imds-agent maintainers"
_VERSION = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")  # what Distributor accepts as a version name


def sha256(path: str) -> str:
    """The file's sha256, hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def zip_name(kind: str, version: str) -> str:
    """The zip of one platform family: imds-agent-<version>-deb.zip, imds-agent-<version>-rpm.zip."""
    return f"imds-agent-{version}-{kind}.zip"


def _stamp() -> tuple[int, int, int, int, int, int]:
    epoch = int(os.environ.get("SOURCE_DATE_EPOCH", "315532800"))  # zip cannot say anything before 1980
    t = time.gmtime(max(epoch, 315532800))
    return t.tm_year, t.tm_mon, t.tm_mday, t.tm_hour, t.tm_min, t.tm_sec


def _member(zf: zipfile.ZipFile, name: str, data: bytes, mode: int) -> None:
    info = zipfile.ZipInfo(name, date_time=_stamp())
    info.external_attr = (0o100000 | mode) << 16  # a regular file with these permissions, as unzip restores them
    info.create_system = 3  # Unix, so the modes are read
    info.compress_type = zipfile.ZIP_DEFLATED
    zf.writestr(info, data)


def write_zip(path: str, package: str, scripts_dir: str = HERE) -> None:
    """The zip at ``path``: the three scripts (0755) and the package file (0644) at its top level."""
    with zipfile.ZipFile(path, "w") as zf:
        for script in SCRIPTS:
            with open(os.path.join(scripts_dir, script), "rb") as fh:
                _member(zf, script, fh.read(), 0o755)
        with open(package, "rb") as fh:
            _member(zf, os.path.basename(package), fh.read(), 0o644)


def manifest(version: str, zips: dict[str, tuple[str, str]]) -> dict[str, Any]:
    """The Distributor manifest for ``zips`` (package kind -> (zip name, sha256))."""
    packages: dict[str, Any] = {}
    for kind, (name, _) in sorted(zips.items()):
        for platform, versions in PLATFORMS[kind].items():
            packages[platform] = {v: {arch: {"file": name} for arch in ARCHES} for v in versions}
    return {
        "schemaVersion": "2.0",
        "version": version,
        "publisher": PUBLISHER,
        "packages": packages,
        "files": {name: {"checksums": {"sha256": digest}} for name, digest in sorted(zips.values())},
    }


def build(packages: dict[str, str], out: str, version: str) -> str:
    """Write one zip per package kind and manifest.json into ``out``; return the manifest's path."""
    if not _VERSION.match(version):
        raise ValueError(f"{version!r} is not a Distributor version name")
    unknown = set(packages) - set(PLATFORMS)
    if unknown or not packages:
        raise ValueError(f"package kinds must be among {sorted(PLATFORMS)}, got {sorted(packages)}")
    os.makedirs(out, exist_ok=True)
    zips = {}
    for kind, package in packages.items():
        name = zip_name(kind, version)
        write_zip(os.path.join(out, name), package)
        zips[kind] = (name, sha256(os.path.join(out, name)))
    path = os.path.join(out, "manifest.json")
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(manifest(version, zips), fh, indent=2)
        fh.write("\n")
    return path


def version_of(package: str) -> Optional[str]:
    """The version in a package file's name (imds-agent_V_all.deb, imds-agent-V-1.noarch.rpm)."""
    match = re.match(r"^imds-agent[_-]([0-9][A-Za-z0-9.+~]*)[_-]", os.path.basename(package))
    return match.group(1) if match else None


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="Build the SSM Distributor package of imds-agent.")
    parser.add_argument("--deb", help="the .deb (make deb)")
    parser.add_argument("--rpm", help="the .rpm (make rpm)")
    parser.add_argument("--version", help="default: the version in the package file names")
    parser.add_argument("--out", default="dist/distributor")
    args = parser.parse_args(argv)
    packages = {kind: path for kind, path in (("deb", args.deb), ("rpm", args.rpm)) if path}
    versions = {version_of(p) for p in packages.values()}
    version = args.version or (versions.pop() if len(versions) == 1 else None)
    if version is None:
        print(f"cannot tell one version from {sorted(packages.values())}; give --version", file=sys.stderr)
        return 2
    try:
        path = build(packages, args.out, version)
    except (OSError, ValueError) as exc:
        print(f"distributor: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
