"""Docker and containerd, really running, inside a test's network namespace, with all their state under a workdir.

    with docker_daemon(netns, workdir) as docker:
        image = docker.client_image()                      # imds-agent-test/client:1, no registry involved
        web = docker.run(image, "sleep", "infinity", name="web", labels={"team": "a"})
        docker.pid(web.id)                                 # State.Pid: the container's init as the host sees it
        docker.config_path(web.id)                         # <data_root>/containers/<id>/config.v2.json
        ctrd = docker.containerd
        job = ctrd.run(ctrd.client_image(), "job", netns="other",
                       annotations={"io.kubernetes.cri.sandbox-namespace": "prod"})
        job.config_path                                    # <state>/io.containerd.runtime.v2.task/imds-test/job/...

What runs: containerd (Debian's 1.6, with a config under the workdir) and dockerd (Debian's 20.10) using it, both
in the caller's network namespace ``netns`` (entered with ``nsenter --net``: ``ip netns exec`` would remount /sys
and hide /sys/fs/cgroup), so docker0, the containers' veths and the nat and filter rules Docker writes with
``--iptables=true`` exist only there, where the agent under test meets them. Docker's containers get the cgroupfs
layout ``/docker/<id>``, ctr's ``/imds-test/<id>``, in every hierarchy (v1 controllers, name=systemd, and the v2
one of a hybrid host).

Both daemons also run in a mount namespace of their own whose mounts are slaves of the host's, with a fresh tmpfs
on /run: containerd 1.6 puts its shims' sockets in /run/containerd/s and runc's state in /run/containerd/runc, and
dockerd 20.10 creates /run/docker/plugins, whatever their root and state options say; there these vanish with the
namespace. Every mount the daemons make (overlay roots, /dev/shm, the containers' namespace bind mounts) is made in
that namespace too, so the host's mount table never changes and nothing stays mounted once they are gone. The
host's /run/netns is bound back in, still a slave of the host's shared one, so ``ctr run --with-ns`` finds
namespaces the caller creates later. The state files the agent reads (Docker's config.v2.json, containerd's task
bundles) are plain files under the workdir, the same seen from the host as from inside; only the unpacked image
layers are on tmpfs, inside.

Teardown removes the containers and user-defined networks, stops dockerd and containerd, kills whatever is left
(containers by their cgroups, daemons and shims by their arguments, which name the workdir: so does any process
whose arguments name it), deletes the bridges left in ``netns`` and removes the workdir, whether the test passed
or not. Docker's iptables rules stay in ``netns`` until the caller deletes it (removing them would mean telling
them from the caller's). Each bed leaves a record in RECORDS while it lives; the next bed to start clears the
leftovers of any whose creator is gone (a run that was killed), so a crash never breaks the next run.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Optional

from imds_agent.sandbox.netns import wait_for

from .packages import CACHE, REPO, debian_root

log = logging.getLogger(__name__)

ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C"}
# What a client container needs to ask the metadata service the ways real clients do. python3-cffi-backend is named
# because debootstrap does not resolve the virtual package python3-cryptography depends on (it provides it).
CLIENT_INCLUDE = "curl,python3,python3-botocore,awscli,ca-certificates,iproute2,python3-cffi-backend"
CLIENT_IMAGE = "imds-agent-test/client:1"
CTR_NAMESPACE = "imds-test"  # the containerd namespace ctr containers are started in
DOCKER_NAMESPACE = "moby"  # the containerd namespace dockerd starts its containers in
TASKS = "io.containerd.runtime.v2.task"  # containerd's task bundles: <state>/TASKS/<namespace>/<id>/config.json
RECORDS = Path("/run/imds-agent-test/dockerbed")
BINARIES = ("dockerd", "docker", "containerd", "containerd-shim-runc-v2", "ctr", "runc", "nsenter", "unshare")
# Left out of the image: what only apt and people read. The cached root itself stays whole.
IMAGE_EXCLUDES = ("./.complete", "./debootstrap", "./var/cache/apt/archives/*.deb", "./var/lib/apt/lists/*",
                  "./usr/share/doc/*", "./usr/share/man/*", "./usr/share/info/*", "./usr/share/locale/*",
                  "./proc/*", "./sys/*", "./dev/*", "./run/*", "./tmp/*")  # fmt: skip
MAX_SOCKET_PATH = 107  # sun_path holds 108 bytes with the terminating NUL


class DockerUnavailable(Exception):
    """dockerd cannot run on this kernel (the message says what is missing); tests skip on it."""


def _run(
    argv: Sequence[str],
    timeout: float = 60,
    check: bool = True,
    env: Optional[Mapping[str, str]] = None,
    stdin: Any = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` with a fixed PATH, capturing output; raise with the output when ``check`` and it fails."""
    proc = subprocess.run(
        list(argv), env=dict(env or ENV), capture_output=True, text=True, timeout=timeout, stdin=stdin
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{list(argv)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def client_root() -> Path:
    """The client image's root filesystem: Debian 12 with CLIENT_INCLUDE, built by debootstrap once and cached."""
    return debian_root("debian12-client", CLIENT_INCLUDE)


def image_tar_path() -> Path:
    """Where the client image is cached as a ``docker save`` archive (``docker load`` and ``ctr images import``
    both read it); the name changes with anything that changes the image."""
    key = hashlib.sha256("\n".join((CLIENT_INCLUDE, CLIENT_IMAGE, *IMAGE_EXCLUDES)).encode()).hexdigest()[:12]
    return CACHE / f"client-image-{key}.tar"


# --- processes, cgroups and mounts, as the host sees them ------------------------------------------------------------
def _start_time(pid: int) -> Optional[int]:
    """A live process's start time in clock ticks since boot (with its pid, what tells it from a later one)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            stat = fh.read()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    return None if fields[0] == "Z" else int(fields[19])


def alive(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie is not: it is gone but for its parent's, or init's, reaping)."""
    return _start_time(pid) is not None


def _cmdline_pids(workdir: Path) -> list[int]:
    """Processes with an argument naming ``workdir`` or a path under it: the daemons and the shims (whose
    arguments hold their containerd's socket), not the containers. The calling process is left out."""
    exact = os.fsencode(workdir)
    under = exact + b"/"
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                args = fh.read().split(b"\0")
        except OSError:
            continue
        if any(a.endswith(exact) or under in a for a in args):
            found.append(int(entry))
    return found


def _kill_and_wait(pids: Sequence[int], timeout: float = 10) -> None:
    """SIGKILL ``pids`` and wait until none is left (a zombie counts as gone: its parent or init reaps it)."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    wait_for(lambda: not any(alive(p) for p in pids), timeout, 0.05)


def _unescape(field: str) -> str:
    """A /proc/self/mountinfo path: spaces, tabs, newlines and backslashes come as octal escapes."""
    for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(code, char)
    return field


def mounts() -> list[tuple[str, str, str]]:
    """(mount point, filesystem type, propagation fields such as 'shared:2') of this mount namespace's mounts."""
    with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as fh:
        lines = fh.read().splitlines()
    found = []
    for line in lines:
        left, _, right = line.partition(" - ")
        fields = left.split()
        found.append((_unescape(fields[4]), right.split()[0], " ".join(fields[6:])))
    return found


def cgroup_roots() -> list[Path]:
    """The mounted cgroup hierarchies: one per v1 controller (and name=systemd) and the v2 one, hybrid or not."""
    return [Path(point) for point, fstype, _ in mounts() if fstype in ("cgroup", "cgroup2")]


def _bundle_cgroups(state: Path) -> list[str]:
    """The cgroup paths (relative to each hierarchy) of the containers whose task bundles are under ``state``."""
    paths = []
    for config in state.glob(f"{TASKS}/*/*/config.json"):
        try:
            path = json.loads(config.read_text()).get("linux", {}).get("cgroupsPath", "")
        except (OSError, ValueError):
            continue
        if isinstance(path, str) and path.startswith("/") and ":" not in path:  # the cgroupfs layout, as configured
            paths.append(path)
    return paths


def _kill_cgroups(paths: Sequence[str]) -> None:
    """Kill every process in the cgroups ``paths`` in every hierarchy (after a crash a container's init may have
    lost its shim and be nobody's child), then remove them, and their parents once empty (/docker, /imds-test)."""
    roots = cgroup_roots()
    for path in paths:
        dirs = [root / path.lstrip("/") for root in roots]
        for _ in range(50):
            pids: set[int] = set()
            for d in dirs:
                try:
                    pids.update(int(p) for p in (d / "cgroup.procs").read_text().split())
                except (OSError, ValueError):
                    pass
            if not pids:
                break
            _kill_and_wait(sorted(pids), timeout=2)
        for d in dirs:
            for victim in (d, d.parent):
                try:
                    victim.rmdir()
                except OSError:
                    pass  # not there, or still in use: by another bed or the host's own Docker


def _unmount_under(workdir: Path) -> None:
    """Unmount anything under ``workdir`` in the host's mount namespace, deepest first. The daemons mount only in
    their own namespace; this is for whatever else did."""
    prefix = f"{workdir}/"
    points = {p for p, _, _ in mounts() if p.startswith(prefix) or p == str(workdir)}
    for point in sorted(points, key=len, reverse=True):
        _run(["umount", "-l", point], check=False, timeout=20)


def _delete_bridges(netns: str) -> None:
    """Delete the bridges dockerd made in ``netns`` (docker0, br-<network id>): they outlive the daemon, and a
    user-defined network's route left there would make the next daemon refuse the same subnet."""
    if not os.path.exists(f"/run/netns/{netns}"):
        return
    proc = _run(["ip", "-j", "-n", netns, "link", "show", "type", "bridge"], check=False, timeout=10)
    try:
        links = json.loads(proc.stdout or "[]")
    except ValueError:
        return
    for link in links:
        name = link.get("ifname", "")
        if name == "docker0" or (name.startswith("br-") and len(name) == 15):
            _run(["ip", "-n", netns, "link", "del", name], check=False, timeout=10)


def _clear(workdir: Path, netns: str, cgroups: Sequence[str] = ()) -> None:
    """Whatever a bed left: its containers (in ``cgroups`` and those its bundles name), daemons and shims killed,
    bridges deleted, mounts undone, the workdir removed."""
    _kill_cgroups(sorted(set(cgroups) | set(_bundle_cgroups(workdir / "containerd" / "state"))))
    _kill_and_wait(_cmdline_pids(workdir))
    _delete_bridges(netns)
    _unmount_under(workdir)
    shutil.rmtree(workdir, ignore_errors=True)


def sweep_stale() -> list[Path]:
    """Clear the beds whose creating process is gone (a run that was killed or crashed); return their workdirs."""
    cleared = []
    for record in sorted(RECORDS.glob("*.json")) if RECORDS.is_dir() else []:
        try:
            info = json.loads(record.read_text())
            creator, start, workdir, netns = info["creator"], info["start"], Path(info["workdir"]), info["netns"]
        except (OSError, ValueError, KeyError, TypeError):
            record.unlink(missing_ok=True)
            continue
        if _start_time(creator) == start:
            continue
        _clear(workdir, netns)
        record.unlink(missing_ok=True)
        cleared.append(workdir)
    return cleared


def unavailable_reason(netns: str) -> Optional[str]:
    """Why dockerd could not run on this kernel, or None: beyond the packages it needs overlayfs, cgroups, bridges
    and veths (tried in ``netns``) and the nat table."""
    with open("/proc/filesystems", encoding="ascii") as fh:
        if "overlay" not in fh.read().split():
            return "the kernel has no overlay filesystem (Docker's overlay2 and containerd's overlayfs need it)"
    if not cgroup_roots():
        return "no cgroup hierarchy is mounted"
    for kind, extra in (("bridge", []), ("veth", ["peer", "name", "imdsbed-peer"])):
        proc = _run(["ip", "-n", netns, "link", "add", "imdsbed-probe", "type", kind, *extra], check=False)
        if proc.returncode != 0:
            return f"the kernel cannot make a {kind} link: {proc.stderr.strip()}"
        _run(["ip", "-n", netns, "link", "del", "imdsbed-probe"], check=False)
    nat = _run(["nsenter", f"--net=/run/netns/{netns}", "--", "iptables", "-t", "nat", "-S"], check=False)
    if nat.returncode != 0:
        return f"iptables has no nat table here: {nat.stderr.strip()}"
    return None


def _share_netns_dir() -> None:
    """/run/netns must be a shared mount for namespaces made after the daemons started to reach their mount
    namespace; ``ip netns add`` and pyroute2 make it so, and this does what they do if something undid it."""
    for point, _, propagation in mounts():
        if point == "/run/netns" and "shared:" not in propagation:
            _run(["mount", "--make-shared", "/run/netns"])


# --- the bed ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Container:
    """A container Docker started: its full id and its name; for a run that was waited for (``detach=False``)
    its exit status and output, else ``returncode`` None."""

    id: str
    name: str
    returncode: Optional[int] = None
    stdout: str = ""
    stderr: str = ""


@dataclass(frozen=True)
class Task:
    """A container ctr started in containerd namespace ``namespace``: its id (also its name), the pid of its init
    as the host sees it, and its task bundle directory (there while the task lives)."""

    id: str
    namespace: str
    pid: int
    bundle: Path

    @property
    def config_path(self) -> Path:
        """The bundle's OCI runtime spec: the annotations, the cgroup path, the namespaces the container joined."""
        return self.bundle / "config.json"


class Containerd:
    """The bed's containerd, which also serves dockerd. ``ctr`` runs in the daemons' mount namespace, so that its
    I/O fifos (under /run/containerd/fifo) and the /run/netns paths it names are the ones the shims see."""

    def __init__(self, workdir: Path, image_tar: Callable[[], Path]):
        self.dir = workdir / "containerd"
        self.address = workdir / "ctrd.sock"  # short: the socket paths under the workdir must fit sun_path
        self.root = self.dir / "root"  # content store, metadata database, snapshots
        self.state = self.dir / "state"  # the task bundles: TASKS/<namespace>/<id>/config.json
        self.config = self.dir / "config.toml"
        self.logs = workdir / "logs"
        self.namespace = CTR_NAMESPACE
        self.proc: Optional[subprocess.Popen[bytes]] = None
        self.timings: dict[str, float] = {}  # seconds: ctr_import, ctr_run
        # The cgroup paths of the containers started here, by ctr or dockerd: their parents go at teardown even
        # when the containers were removed before (and with them the bundles that name them).
        self.cgroups: set[str] = set()
        self._image_tar = image_tar  # the cached archive, built by the bed's Docker when missing
        self._image: Optional[str] = None

    @property
    def pid(self) -> int:
        """containerd's pid: the way into the daemons' mount and network namespaces."""
        assert self.proc is not None, "containerd is not running"
        return self.proc.pid

    def write_config(self) -> None:
        """A config naming paths under the workdir only. Off: the CRI plugin (it would serve a CRI socket and keep
        CNI state under /etc and /opt) and the snapshotters this host cannot use; the opt plugin's directory is ours
        (/opt/containerd by default)."""
        for d in (self.root, self.state, self.dir / "opt", self.logs):
            d.mkdir(parents=True, exist_ok=True)
        disabled = ["io.containerd.grpc.v1.cri"] + [
            f"io.containerd.snapshotter.v1.{name}" for name in ("aufs", "btrfs", "devmapper", "zfs")
        ]
        q = json.dumps  # a JSON string is a TOML basic string
        self.config.write_text(
            f"version = 2\nroot = {q(str(self.root))}\nstate = {q(str(self.state))}\n"
            f"disabled_plugins = {q(disabled)}\n"
            f"[grpc]\n  address = {q(str(self.address))}\n"
            f"[ttrpc]\n  address = {q(f'{self.address}.ttrpc')}\n"
            f"[debug]\n  address = {q(f'{self.address}.debug')}\n"
            f'[plugins."io.containerd.internal.v1.opt"]\n  path = {q(str(self.dir / "opt"))}\n'
        )

    def ctr(
        self, *args: str, namespace: Optional[str] = None, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        """``ctr`` against this containerd, in containerd namespace ``namespace`` (CTR_NAMESPACE unless told)."""
        argv = ["nsenter", f"--target={self.pid}", "--mount", "--", "ctr", f"--address={self.address}",
                f"--namespace={namespace or self.namespace}", *args]  # fmt: skip
        return _run(argv, timeout=timeout, check=check)

    def client_image(self) -> str:
        """The client image, imported into CTR_NAMESPACE from the cached archive once per bed; its reference
        (docker.io/imds-agent-test/client:1: ctr writes names out in full)."""
        if self._image is None:
            started = time.monotonic()
            self.ctr("images", "import", str(self._image_tar()), timeout=300)
            self.timings["ctr_import"] = time.monotonic() - started
            refs = self.ctr("images", "ls", "--quiet").stdout.split()
            wanted = [r for r in refs if r == CLIENT_IMAGE or r.endswith("/" + CLIENT_IMAGE)]
            assert wanted, f"ctr images import made {refs}, not {CLIENT_IMAGE}"
            self._image = wanted[0]
        return self._image

    def bundle_path(self, container_id: str, namespace: Optional[str] = None) -> Path:
        """Where containerd keeps the task bundle of ``container_id`` while its task lives."""
        return self.state / TASKS / (namespace or self.namespace) / container_id

    def run(
        self,
        image: str,
        container_id: str,
        *argv: str,
        netns: Optional[str] = None,
        labels: Optional[Mapping[str, str]] = None,
        annotations: Optional[Mapping[str, str]] = None,
        cgroup: Optional[str] = None,
        env: Optional[Mapping[str, str]] = None,
    ) -> Task:
        """Start ``argv`` (the image's ``sleep infinity`` when empty) detached in a new container, in network
        namespace /run/netns/``netns`` (the caller's) or, when None, in an empty one of its own.

        ``annotations`` go into the OCI spec (the bundle's config.json). ``labels`` are containerd's, kept in its
        metadata database; ctr 1.6 copies them into the spec's annotations as well. ``cgroup`` replaces ctr's
        cgroup path /<namespace>/<id>. The container's output goes to logs/ctr-<id>.log."""
        pid_file = self.logs / f"ctr-{container_id}.pid"
        args = ["run", "--detach", f"--pid-file={pid_file}", f"--log-uri=file://{self.logs}/ctr-{container_id}.log"]
        if netns is not None:
            args.append(f"--with-ns=network:/run/netns/{netns}")
        for flag, values in (("--label", labels), ("--annotation", annotations), ("--env", env)):
            args += [f"{flag}={k}={v}" for k, v in (values or {}).items()]
        if cgroup is not None:
            args.append(f"--cgroup={cgroup}")
        started = time.monotonic()
        self.cgroups.add(cgroup or f"/{self.namespace}/{container_id}")
        self.ctr(*args, image, container_id, *argv)
        self.timings["ctr_run"] = time.monotonic() - started
        return Task(container_id, self.namespace, int(pid_file.read_text()), self.bundle_path(container_id))

    def exec(
        self, container_id: str, *argv: str, user: Optional[str] = None, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` in a running ctr container (as ``user`` when given) and wait for it."""
        extra = [f"--user={user}"] if user else []
        exec_id = f"x{uuid.uuid4().hex[:12]}"
        return self.ctr("tasks", "exec", f"--exec-id={exec_id}", *extra, container_id, *argv, check=check,
                        timeout=timeout)  # fmt: skip

    def remove(self, container_id: str) -> None:
        """Kill a ctr container's task, delete the task (and with it the bundle) and the container."""
        self.ctr("tasks", "rm", "--force", container_id, check=False, timeout=30)
        self.ctr("containers", "rm", container_id, check=False, timeout=30)

    def remove_all(self) -> None:
        """Remove every container of CTR_NAMESPACE."""
        for cid in self.ctr("containers", "ls", "--quiet", check=False, timeout=20).stdout.split():
            self.remove(cid)


class Docker:
    """A running dockerd and its containerd (``containerd``); see the module docstring."""

    def __init__(self, netns: str, workdir: Path):
        self.netns = netns
        self.workdir = workdir
        self.dir = workdir / "docker"
        self.data_root = self.dir / "data"  # containers/<id>/config.v2.json and hostconfig.json, images, layers
        self.exec_root = workdir / "exec"  # libnetwork's socket is exec/libnetwork/<12 hex digits>.sock
        self.socket = workdir / "docker.sock"
        self.pidfile = self.dir / "docker.pid"
        self.log = workdir / "logs" / "dockerd.log"
        self.containerd = Containerd(workdir, self.client_image_tar)
        # Unpacked image layers go on a tmpfs inside the daemons' mount namespace: creating a file costs 0.7 ms on
        # some disks (this one: half a minute to unpack the image for both daemons), and nothing outside reads them.
        self.scratch = (self.data_root / "overlay2", self.containerd.root / "io.containerd.snapshotter.v1.overlayfs")
        self.proc: Optional[subprocess.Popen[bytes]] = None
        self.record = RECORDS / f"{os.getpid()}-{uuid.uuid4().hex[:8]}.json"
        self.timings: dict[str, float] = {}  # seconds: containerd, dockerd, image_build, image_load, run
        self.env = dict(ENV, DOCKER_HOST=f"unix://{self.socket}", DOCKER_CONFIG=str(self.dir / "cli"))
        self._image: Optional[str] = None
        self._closed = False

    # --- starting -------------------------------------------------------------------------------------------------
    def check_workdir(self) -> None:
        """Refuse a workdir that is not empty (teardown removes it) or too long for the sockets under it."""
        if self.workdir.exists() and any(self.workdir.iterdir()):
            raise AssertionError(f"{self.workdir} is not empty: the bed owns its workdir and removes it")
        sockets = (f"{self.containerd.address}.debug", str(self.exec_root / "libnetwork" / f"{0:012}.sock"))
        if max(map(len, sockets)) > MAX_SOCKET_PATH:
            raise ValueError(f"workdir {self.workdir} is too long a path for the daemons' unix sockets")

    def start(self) -> None:
        """Start containerd, then dockerd on it; raise with their logs if either does not come up."""
        RECORDS.mkdir(parents=True, exist_ok=True)
        me = os.getpid()
        self.record.write_text(json.dumps({"creator": me, "start": _start_time(me), "workdir": str(self.workdir),
                                           "netns": self.netns}))  # fmt: skip
        staging = self.workdir / "ns" / "netns"
        for d in (self.data_root, self.exec_root, self.dir / "cli", staging, *self.scratch):
            d.mkdir(parents=True, exist_ok=True)
        self.containerd.write_config()
        # Instead of /etc/docker/daemon.json, so that only this and the flags below count. 20.10 makes a trust key,
        # by default /etc/docker/key.json; only the config file can name another place.
        (self.dir / "daemon.json").write_text(json.dumps({"deprecated-key-path": str(self.dir / "key.json")}))

        started = time.monotonic()
        argv = ["nsenter", f"--net=/run/netns/{self.netns}", "--", "unshare", "--mount", "--propagation", "slave",
                "--", sys.executable, "-m", "tests.privileged.dockerbed", "ns-init", str(staging),
                str(self.data_root), *map(str, self.scratch), "--",
                "containerd", f"--config={self.containerd.config}"]  # fmt: skip
        self.containerd.proc = self._spawn(argv, self.containerd.logs / "containerd.log")
        self._wait_up(self.containerd.proc, lambda: _connects(self.containerd.address))
        self.timings["containerd"] = time.monotonic() - started

        started = time.monotonic()
        argv = ["nsenter", f"--target={self.containerd.pid}", "--mount", "--net", "--", "dockerd",
                f"--config-file={self.dir / 'daemon.json'}", f"--data-root={self.data_root}",
                f"--exec-root={self.exec_root}", f"--pidfile={self.pidfile}", f"--host=unix://{self.socket}",
                f"--containerd={self.containerd.address}", f"--containerd-namespace={DOCKER_NAMESPACE}",
                "--iptables=true", "--storage-driver=overlay2", "--exec-opt=native.cgroupdriver=cgroupfs",
                "--userland-proxy=false"]  # fmt: skip
        self.proc = self._spawn(argv, self.log, env=dict(ENV, HOME=str(self.dir)))
        self._wait_up(self.proc, lambda: self.cli("version", check=False, timeout=10).returncode == 0)
        self.timings["dockerd"] = time.monotonic() - started

    def _spawn(
        self, argv: list[str], logfile: Path, env: Optional[Mapping[str, str]] = None
    ) -> subprocess.Popen[bytes]:
        # A session of its own: an interrupt meant for pytest must not stop the daemons before the teardown does.
        with open(logfile, "ab") as out:
            return subprocess.Popen(argv, env=dict(env or ENV), stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)  # fmt: skip

    def _wait_up(self, proc: subprocess.Popen[bytes], ready: Callable[[], bool], timeout: float = 60) -> None:
        if not wait_for(lambda: proc.poll() is not None or ready(), timeout, 0.05) or proc.poll() is not None:
            raise AssertionError(f"a daemon did not start (exit {proc.poll()}):\n{self.daemon_logs()}")

    def daemon_logs(self, limit: int = 3000) -> str:
        """The ends of containerd's and dockerd's logs, for assertion messages (the workdir goes at teardown)."""
        parts = []
        for path in (self.containerd.logs / "containerd.log", self.log):
            text = path.read_text(errors="replace") if path.exists() else ""
            parts.append(f"--- {path.name}\n{text[-limit:]}")
        return "\n".join(parts)

    # --- Docker ---------------------------------------------------------------------------------------------------
    def cli(
        self, *args: str, check: bool = True, timeout: float = 60, stdin: Any = None
    ) -> subprocess.CompletedProcess[str]:
        """``docker`` against this daemon (its socket, a client config of its own)."""
        return _run(["docker", *args], timeout=timeout, check=check, env=self.env, stdin=stdin)

    def client_image_tar(self) -> Path:
        """The cached ``docker save`` archive of the client image; when missing (the first run, or the image
        changed) built here: the debootstrap root ``docker import``ed, then saved."""
        target = image_tar_path()
        if target.exists():
            return target
        for stale in target.parent.glob(f"{target.name}.*.tmp"):  # from a build that was killed
            pid = stale.name.split(".")[-2]
            if pid.isdigit() and not alive(int(pid)):
                stale.unlink(missing_ok=True)
        root = client_root()  # debootstrap on the very first run: about a minute
        started = time.monotonic()
        tar = subprocess.Popen(["tar", "-C", str(root), "--numeric-owner", *(f"--exclude={e}" for e in IMAGE_EXCLUDES),
                                "-cf", "-", "."], env=ENV, stdout=subprocess.PIPE)  # fmt: skip
        try:
            self.cli("import", "--change", 'CMD ["sleep", "infinity"]', "-", CLIENT_IMAGE, stdin=tar.stdout,
                     timeout=600)  # fmt: skip
        finally:
            _close(tar.stdout)
            tar.wait(60)
        assert tar.returncode == 0, f"tar of {root} exited {tar.returncode}"
        tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")
        self.cli("save", f"--output={tmp}", CLIENT_IMAGE, timeout=600)
        tmp.rename(target)  # whole or not at all, whoever else builds it meanwhile
        self._image = CLIENT_IMAGE
        self.timings["image_build"] = time.monotonic() - started
        return target

    def client_image(self) -> str:
        """The client image, loaded into this daemon from the cached archive once per bed; its tag."""
        if self._image is None:
            tar = self.client_image_tar()
            if self._image is None:  # not just built by this daemon
                started = time.monotonic()
                with open(tar, "rb") as fh:
                    self.cli("load", stdin=fh, timeout=300)
                self.timings["image_load"] = time.monotonic() - started
                self._image = CLIENT_IMAGE
        return self._image

    def run(
        self,
        image: str,
        *argv: str,
        name: Optional[str] = None,
        network: Optional[str] = None,
        labels: Optional[Mapping[str, str]] = None,
        user: Optional[str] = None,
        detach: bool = True,
        env: Optional[Mapping[str, str]] = None,
        check: bool = True,
        timeout: float = 120,
    ) -> Container:
        """``docker run`` ``argv`` (the image's ``sleep infinity`` when empty) on ``network`` (the default bridge
        when None), as ``user`` ("uid[:gid]" or a name in the image). Detached, it returns once the container
        runs; else once it has exited, with its status and output. The container stays until ``remove`` or the
        end of the bed, so that its state can be read afterwards."""
        cidfile = self.dir / f"cid-{uuid.uuid4().hex}"
        args = ["run", f"--cidfile={cidfile}"] + (["--detach"] if detach else [])
        for flag, value in (("--name", name), ("--network", network), ("--user", user)):
            if value is not None:
                args.append(f"{flag}={value}")
        for flag, values in (("--label", labels), ("--env", env)):
            args += [f"{flag}={k}={v}" for k, v in (values or {}).items()]
        started = time.monotonic()
        proc = self.cli(*args, image, *argv, check=False, timeout=timeout)
        self.timings["run"] = time.monotonic() - started
        cid = cidfile.read_text().strip() if cidfile.exists() else ""
        cidfile.unlink(missing_ok=True)
        if cid:
            self.containerd.cgroups.add(f"/docker/{cid}")  # the cgroupfs driver's layout (no --cgroup-parent here)
        if check and (proc.returncode != 0 or not cid):
            raise AssertionError(f"docker run {list(argv)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n"
                                 f"{proc.stderr[-3000:]}")  # fmt: skip
        name = str(self.inspect(cid)["Name"]).lstrip("/") if cid else ""
        return Container(cid, name, None if detach else proc.returncode, proc.stdout, proc.stderr)

    def exec(
        self, container: str, *argv: str, user: Optional[str] = None, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        """``docker exec`` ``argv`` in a running container (as ``user`` when given) and wait for it."""
        extra = [f"--user={user}"] if user else []
        return self.cli("exec", *extra, container, *argv, check=check, timeout=timeout)

    def inspect(self, container: str) -> dict[str, Any]:
        """``docker inspect`` of a container, by id or name."""
        found: list[dict[str, Any]] = json.loads(self.cli("inspect", "--type=container", container).stdout)
        return found[0]

    def id(self, container: str) -> str:
        """The container's full id (64 hex digits), as its cgroup path and its state directory name it."""
        return str(self.inspect(container)["Id"])

    def pid(self, container: str) -> int:
        """State.Pid: the container's init as the host sees it (0 once it has exited)."""
        return int(self.inspect(container)["State"]["Pid"])

    def config_path(self, container: str) -> Path:
        """Docker's own state of the container: <data_root>/containers/<id>/config.v2.json."""
        return self.data_root / "containers" / self.id(container) / "config.v2.json"

    def bundle_path(self, container: str) -> Path:
        """The containerd task bundle dockerd had made for the container (its OCI spec is config.json there)."""
        return self.containerd.bundle_path(self.id(container), DOCKER_NAMESPACE)

    def address(self, container: str, network: str = "bridge") -> str:
        """The container's IPv4 address on ``network``."""
        return str(self.inspect(container)["NetworkSettings"]["Networks"][network]["IPAddress"])

    def logs(self, container: str) -> str:
        """What the container wrote, stdout then stderr."""
        proc = self.cli("logs", container, check=False)
        return proc.stdout + proc.stderr

    def remove(self, container: str) -> None:
        """Kill and delete a container."""
        self.cli("rm", "--force", container, check=False, timeout=60)

    def network_create(self, name: str, subnet: str, gateway: Optional[str] = None) -> str:
        """A user-defined bridge network on ``subnet``, its gateway (the bridge's address) the subnet's first
        address unless given; its id (the bridge is br-<first 12 digits>)."""
        gateway = gateway or str(next(ipaddress.ip_network(subnet).hosts()))
        proc = self.cli("network", "create", "--driver=bridge", f"--subnet={subnet}", f"--gateway={gateway}", name)
        return proc.stdout.strip()

    def gateway(self, network: str = "bridge") -> str:
        """The gateway of ``network``: its bridge's address in the daemons' network namespace."""
        found = json.loads(self.cli("network", "inspect", network).stdout)[0]
        config = found["IPAM"]["Config"][0]
        if config.get("Gateway"):
            return str(config["Gateway"])
        # The default bridge's IPAM names only the subnet: the address is docker0's.
        bridge = found.get("Options", {}).get("com.docker.network.bridge.name") or f"br-{found['Id'][:12]}"
        links = json.loads(_run(["ip", "-j", "-4", "-n", self.netns, "addr", "show", "dev", bridge]).stdout)
        return str(links[0]["addr_info"][0]["local"])

    # --- teardown -------------------------------------------------------------------------------------------------
    def close(self) -> None:
        """Remove the containers and networks, stop dockerd and containerd, clear what is left; idempotent. Each
        step is bounded and on its own, so that one failing leaves nothing behind that the next would remove."""
        if self._closed:
            return
        self._closed = True
        # The containers' cgroups, known and read while their bundles still say where: runc removes a
        # container's own cgroup when it goes, the parents (/docker, /imds-test) are removed here once empty.
        cgroups = sorted(self.containerd.cgroups | set(_bundle_cgroups(self.containerd.state)))
        steps: list[Callable[[], object]] = []
        if self.proc is not None and self.proc.poll() is None:
            steps += [self._remove_containers, self._remove_networks]
        if self.containerd.proc is not None and self.containerd.proc.poll() is None:
            steps.append(self.containerd.remove_all)
        steps += [
            lambda: _stop(self.proc, 20),
            lambda: _stop(self.containerd.proc, 10),
            lambda: _clear(self.workdir, self.netns, cgroups),
            lambda: self.record.unlink(missing_ok=True),
        ]
        for step in steps:
            try:
                step()
            except Exception as exc:  # noqa: BLE001 - go on: what a failed step leaves, the next sweep clears
                log.warning("dockerbed teardown of %s: %s", self.workdir, exc)

    def _remove_containers(self) -> None:
        ids = self.cli("ps", "--all", "--quiet", "--no-trunc", check=False, timeout=20).stdout.split()
        if ids:
            self.cli("rm", "--force", *ids, check=False, timeout=60)

    def _remove_networks(self) -> None:
        self.cli("network", "prune", "--force", check=False, timeout=30)  # dockerd deletes their bridges


def _connects(path: Path) -> bool:
    """Whether a unix socket at ``path`` accepts a connection."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(str(path))
        except OSError:
            return False
    return True


def _stop(proc: Optional[subprocess.Popen[bytes]], grace: float) -> None:
    """SIGTERM, ``grace`` seconds for an orderly exit, then SIGKILL."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def _close(stream: Optional[IO[bytes]]) -> None:
    if stream is not None:
        try:
            stream.close()
        except OSError:
            pass


@contextmanager
def docker_daemon(netns: str, workdir: Path) -> Iterator[Docker]:
    """dockerd and containerd running in network namespace ``netns`` (which the caller made and deletes), with all
    their state under ``workdir`` (made if missing, else it must be empty; removed afterwards); see the module
    docstring. Give it a directory of its own, such as ``tmp_path / "docker"``: teardown kills every process whose
    arguments name a path under it. Raises DockerUnavailable when this kernel cannot run the daemons,
    AssertionError when the packages are missing (the Makefile's apt step installs them) or a daemon does not
    start."""
    if os.geteuid() != 0:
        raise DockerUnavailable("needs root")
    missing = [b for b in BINARIES if shutil.which(b, path=ENV["PATH"]) is None]
    if missing:
        raise AssertionError(f"not installed: {', '.join(missing)} (make .stamp-apt installs docker.io and containerd)")
    if not os.path.exists(f"/run/netns/{netns}"):
        raise AssertionError(f"no network namespace /run/netns/{netns}")
    reason = unavailable_reason(netns)
    if reason:
        raise DockerUnavailable(reason)
    _share_netns_dir()
    sweep_stale()
    bed = Docker(netns, Path(workdir))
    bed.check_workdir()
    try:
        bed.start()
        yield bed
    finally:
        bed.close()


# --- run as a program: inside the daemons' mount namespace, and the crash test's victim ------------------------------
def _ns_init(staging: Path, data_root: str, scratch: Sequence[str], argv: list[str]) -> None:
    """The first process of the daemons' mount namespace (unshare made it, its mounts slaves of the host's): a
    tmpfs on each ``scratch`` directory and on /run, the host's /run/netns bound back in, then become ``argv``.

    dockerd binds its data root onto itself unless the mount holding it is shared or a slave, and that bind would
    hide the tmpfs under it; so the data root gets a shared bind of its own first (with peers in here only)."""
    _run(["mount", "--bind", data_root, data_root])
    _run(["mount", "--make-shared", data_root])
    for d in scratch:
        _run(["mount", "-t", "tmpfs", "-o", "mode=0700", "dockerbed-layers", d])
    _run(["mount", "--rbind", "/run/netns", str(staging)])
    _run(["mount", "-t", "tmpfs", "-o", "mode=0755,nosuid,nodev", "dockerbed-run", "/run"])
    os.mkdir("/run/netns")
    _run(["mount", "--move", str(staging), "/run/netns"])
    os.chdir("/")
    os.execvpe(argv[0], argv, ENV)


def _hold(netns: str, workdir: Path) -> None:
    """A bed with a container running, its pids printed as a JSON line, until this process is killed: what the
    crash test kills to leave a bed behind."""
    with docker_daemon(netns, workdir) as docker:
        box = docker.run(docker.client_image(), "sleep", "infinity")
        assert docker.proc is not None
        info = {"dockerd": docker.proc.pid, "containerd": docker.containerd.pid, "container": docker.pid(box.id),
                "id": box.id, "record": str(docker.record)}  # fmt: skip
        print(json.dumps(info), flush=True)
        time.sleep(3600)


def main(argv: Sequence[str]) -> None:
    """``ns-init STAGING DATA_ROOT [SCRATCH...] -- ARGV...`` (the bed's own) or ``hold NETNS WORKDIR``."""
    if len(argv) >= 5 and argv[0] == "ns-init" and "--" in argv[3:]:
        end = argv.index("--", 3)
        _ns_init(Path(argv[1]), argv[2], argv[3:end], list(argv[end + 1 :]))
    elif len(argv) == 3 and argv[0] == "hold":
        _hold(argv[1], Path(argv[2]))
    else:
        raise SystemExit("usage: dockerbed ns-init STAGING DATA_ROOT [SCRATCH...] -- ARGV... | hold NETNS WORKDIR")


if __name__ == "__main__":
    main(sys.argv[1:])
