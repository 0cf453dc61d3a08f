"""Fresh network namespaces for privileged tests.

The ``netns`` fixture creates a namespace, moves the test's thread into it (threads and child processes started
afterwards inherit it), brings up ``lo`` and a dummy link holding the metadata addresses, and always returns to the
original namespace and deletes the new one, whatever the test did.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Iterator

import pytest
from pyroute2 import IPRoute, netns

PATH_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C"}
NOBODY = 65534


def run(argv: list[str], check: bool = True, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    """Run a command in the current namespace with a fixed PATH, capturing output."""
    return subprocess.run(argv, env=PATH_ENV, check=check, timeout=timeout, capture_output=True, text=True)


def setup_metadata_link(ipr: IPRoute) -> None:
    """lo up, holding 169.254.169.254 and fd00:ec2::254 too, so that routes to the metadata addresses exist and a
    connection that is not redirected reaches whatever listens there in this namespace."""
    lo = ipr.link_lookup(ifname="lo")[0]
    ipr.link("set", index=lo, state="up")
    ipr.addr("add", index=lo, address="169.254.169.254", prefixlen=32)
    ipr.addr("add", index=lo, address="fd00:ec2::254", prefixlen=128, flags=0x02)  # IFA_F_NODAD


@pytest.fixture
def netns_name() -> Iterator[str]:
    """Enter a fresh namespace with lo and the metadata link up; yield its name; always leave and delete it."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    name = f"imdst-{uuid.uuid4().hex[:10]}"
    netns.create(name)
    netns.pushns(name)
    try:
        with IPRoute() as ipr:
            setup_metadata_link(ipr)
        yield name
    finally:
        netns.popns()
        netns.remove(name)
