"""Helpers for package tests: a cached Debian 12 root (debootstrap), overlay copies of it, package builds."""

from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pyroute2

REPO = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("IMDS_TEST_CACHE", "/var/cache/imds-agent-test"))
MIRROR = "http://deb.debian.org/debian"
# The distribution's packages the .deb depends on, installed once into the cached root so that each test installs
# the package offline (dpkg -i) in seconds.
INCLUDE = "python3,python3-psutil,python3-yaml,python3-urllib3,python3-iptables,adduser,init-system-helpers,procps"
ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C"}


def run(argv: list[str], timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv, env=ENV, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{argv} exited {proc.returncode}:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return proc


def pyroute2_dir() -> str:
    """The directory holding the pyroute2 package the agent is tested with (bundled into the packages)."""
    return str(Path(pyroute2.__file__).resolve().parents[1])


def build(kind: str, out: str, version: str = "") -> str:
    """Build the .deb or .rpm into ``out``; return its path."""
    env = dict(ENV, SOURCE_DATE_EPOCH="1700000000")
    if version:
        env["IMDS_AGENT_VERSION"] = version
    script = REPO / "packaging" / kind / "build.sh"
    proc = subprocess.run([str(script), pyroute2_dir(), out], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().splitlines()[-1]


def debian_root(name: str = "debian12-root", include: str = INCLUDE) -> Path:
    """A minimal Debian 12 root with ``include`` installed, built once and kept in CACHE under ``name``."""
    root = CACHE / name
    marker = root / ".complete"
    if marker.exists() and marker.read_text() == include:
        return root
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = CACHE / f"{name}.tmp"
    run(["rm", "-rf", str(tmp)])
    run(["debootstrap", "--variant=minbase", f"--include={include}", "bookworm", str(tmp), MIRROR], timeout=1200)
    run(["rm", "-rf", str(root)])
    tmp.rename(root)
    marker.write_text(include)
    return root


def systemd_root() -> Path:
    """The same root plus systemd as init, curl for clients and rpm (to install the .rpm), to boot as a container."""
    return debian_root("debian12-systemd", INCLUDE + ",systemd,systemd-sysv,dbus,nftables,curl,iproute2,rpm")


@contextmanager
def overlay_root(lower: Path | None = None, chroot_mounts: bool = True) -> Iterator[Path]:
    """A writable copy-on-write view of a cached root (by default the plain one), unmounted afterwards; with
    ``chroot_mounts`` it also gets /proc and /dev for chroot (a booted container mounts its own)."""
    lower = lower or debian_root()
    work = Path(tempfile.mkdtemp(prefix="imds-root-"))
    upper, scratch, merged = work / "upper", work / "work", work / "root"
    for d in (upper, scratch, merged):
        d.mkdir()
    run(
        ["mount", "-t", "overlay", "overlay", "-o", f"lowerdir={lower},upperdir={upper},workdir={scratch}", str(merged)]
    )
    mounted = [merged]
    try:
        if chroot_mounts:
            run(["mount", "-t", "proc", "proc", str(merged / "proc")])
            mounted.append(merged / "proc")
            run(["mount", "--bind", "/dev", str(merged / "dev")])
            mounted.append(merged / "dev")
        yield merged
    finally:
        for path in reversed(mounted):
            run(["umount", "-l", str(path)], check=False)
        run(["rm", "-rf", str(work)], check=False)


def ssm_script(name: str, **params: str) -> str:
    """The shell step of packaging/ssm/ImdsAgent-NAME.json with its parameters filled in (defaults unless given),
    as SSM Run Command would run it."""
    doc = json.loads((REPO / "packaging" / "ssm" / f"ImdsAgent-{name}.json").read_text())
    values = {k: v.get("default", "") for k, v in doc["parameters"].items()} | params
    text = "\n".join(doc["mainSteps"][0]["inputs"]["runCommand"]) + "\n"
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: values[m.group(1)], text)
