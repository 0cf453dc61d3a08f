"""From a socket inode to the process holding it, and from the process to a Caller.

The pid search is ordered by cost: processes that called recently (most callers are daemons that call again),
then only the processes of the socket's uid (sock_diag told us the uid), then every process as a last resort
(a socket passed to a process of another uid). A process is described once per (pid, create time): pids are
reused, the pair is not.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from typing import Optional

import psutil

from .caller import Caller

log = logging.getLogger(__name__)

PROC = "/proc"
RECENT_PIDS = 256
DESCRIBED = 1024
START_TICKS = 19  # /proc/PID/stat field 22, counted from the state field
_CONTAINER = re.compile(r"(?:docker-|cri-containerd-|crio-|libpod-|/docker/|/kubepods/.*/)([0-9a-f]{64})")
_UNIT = re.compile(r"/([^/]+\.(?:service|scope))(?:/|$)")


class OverBudget(Exception):
    """Identification ran past its deadline; the caller is then unidentified, never guessed."""


def check_deadline(deadline: Optional[float]) -> None:
    """Raise OverBudget once ``deadline`` (time.monotonic()) has passed."""
    if deadline is not None and time.monotonic() > deadline:
        raise OverBudget()


def holds_socket(pid: int, target: str, proc: str = PROC, deadline: Optional[float] = None) -> bool:
    """Whether ``pid`` has an fd that is the socket ``target`` ('socket:[INODE]'); False if it cannot be read.

    Highest fd numbers first: a client that has just connected usually holds the newest descriptor, so the
    search tends to end at the first readlink instead of walking every descriptor of a busy process. A process
    holding 100k descriptors costs ~100 ms to walk, so the deadline is checked as the walk goes.
    """
    fd_dir = f"{proc}/{pid}/fd"
    try:
        names = os.listdir(fd_dir)
    except OSError:
        return False
    prefix = fd_dir + "/"
    for n, name in enumerate(reversed(names)):  # the kernel lists descriptors in ascending order
        if n % 256 == 255:
            check_deadline(deadline)
        try:
            if os.readlink(prefix + name) == target:
                return True
        except OSError:
            continue
    return False


def pids_of_uid(uid: int, proc: str = PROC) -> Iterator[int]:
    """Pids whose /proc entry belongs to ``uid``."""
    return (pid for pid in all_pids(proc) if owner_of(pid, proc) == uid)


def owner_of(pid: int, proc: str = PROC) -> Optional[int]:
    """The uid owning /proc/PID (the effective uid, for ordinary processes), or None if it is gone."""
    try:
        return os.stat(f"{proc}/{pid}").st_uid
    except OSError:
        return None


def stat_field(pid: int, index: int, proc: str = PROC) -> Optional[int]:
    """Field ``index`` (counted from the state, field 3, as 0) of /proc/PID/stat, read directly: this runs for
    every connection. None if the process is gone."""
    try:
        with open(f"{proc}/{pid}/stat", "rb") as fh:
            data = fh.read()
        return int(data[data.rindex(b")") + 2 :].split()[index])
    except (OSError, ValueError, IndexError):
        return None


def all_pids(proc: str = PROC) -> Iterator[int]:
    """Every numeric entry of /proc."""
    try:
        names = os.listdir(proc)
    except OSError:
        return
    for name in names:
        if name.isdigit():
            yield int(name)


def unit_and_container(cgroup_text: str) -> tuple[Optional[str], Optional[str]]:
    """The systemd unit and the container id named by a /proc/PID/cgroup file, where there are any."""
    path = ""
    for line in cgroup_text.splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3 and (parts[0] == "0" or "name=systemd" in parts[1]):
            path = parts[2]
            break
    container = _CONTAINER.search(path)
    units = _UNIT.findall(path)
    unit = units[-1] if units else None
    return unit, container.group(1) if container else None


class ProcessIndex:
    """Finds the pid holding a socket and describes processes, with small caches."""

    def __init__(self, proc: str = PROC):
        self.proc = proc
        self._lock = threading.Lock()
        self._recent: OrderedDict[int, None] = OrderedDict()
        self._described: OrderedDict[tuple[int, float, int, int], Caller] = OrderedDict()
        self.scans = {"recent": 0, "uid": 0, "full": 0, "miss": 0}

    def find_pid(self, inode: int, uid: Optional[int], deadline: Optional[float] = None) -> Optional[int]:
        """The pid of a process holding socket ``inode``, or None if no readable process holds it; raises
        OverBudget past ``deadline``."""
        target = f"socket:[{inode}]"
        with self._lock:
            recent = list(reversed(self._recent))
        if uid is not None:
            # A recent caller of another uid (one holding 100k descriptors, say) must not slow this lookup:
            # its /proc entry's owner is one stat away, its descriptors are not.
            recent = [pid for pid in recent if owner_of(pid, self.proc) == uid]
        tiers: list[tuple[str, Iterable[int]]] = [("recent", recent)]
        if uid is not None:
            tiers.append(("uid", pids_of_uid(uid, self.proc)))
        tiers.append(("full", all_pids(self.proc)))
        tried: set[int] = set()
        for tier, pids in tiers:
            for pid in pids:
                if pid in tried:
                    continue
                tried.add(pid)
                check_deadline(deadline)
                if holds_socket(pid, target, self.proc, deadline):
                    self.scans[tier] += 1
                    self._remember(pid)
                    return pid
        self.scans["miss"] += 1
        return None

    def _remember(self, pid: int) -> None:
        with self._lock:
            self._recent[pid] = None
            self._recent.move_to_end(pid)
            while len(self._recent) > RECENT_PIDS:
                self._recent.popitem(last=False)

    def holders(self, pid: int, inode: int, uid: int, deadline: Optional[float] = None) -> list[int]:
        """Every other process of ``uid`` that holds socket ``inode`` besides ``pid``: parents, children and
        siblings alike (a socket lent to an unrelated process of the same user, or inherited by two children of
        a parent that closed its own copy). Processes of other uids are not searched (reaching them needs
        privileges that make this check moot), nor is pid 1; the walk stops at ``deadline`` (OverBudget)."""
        target = f"socket:[{inode}]"
        found: list[int] = []
        for other in pids_of_uid(uid, self.proc):
            if other in (pid, 1):
                continue
            check_deadline(deadline)
            if holds_socket(other, target, self.proc, deadline):
                found.append(other)
        return found

    def describe(self, pid: int) -> Caller:
        """The Caller for ``pid``; ``unknown`` when it vanished or cannot be read (never a guess)."""
        # The start time in clock ticks: with the pid, a unique key; psutil is needed only when the key is new.
        ticks = stat_field(pid, START_TICKS, self.proc)
        if ticks is None:
            return Caller.unknown(f"process {pid} exited before it could be identified")
        # exec keeps the pid and the start time: the file it runs is part of the key, so a process that execs
        # another program is described afresh and never keeps the rights of what it ran before.
        try:
            running = os.stat(f"{self.proc}/{pid}/exe")
        except OSError:
            return Caller.unknown(f"process {pid} has no readable executable")
        key = (pid, float(ticks), running.st_dev, running.st_ino)
        with self._lock:
            cached = self._described.get(key)
        if cached is not None:
            return cached
        try:
            proc = psutil.Process(pid)
            with proc.oneshot():
                created = proc.create_time()
                exe = proc.exe()
                uid = proc.uids().real
                cmdline = tuple(proc.cmdline())
        except psutil.NoSuchProcess:
            return Caller.unknown(f"process {pid} exited before it could be identified")
        except (psutil.AccessDenied, psutil.ZombieProcess, OSError) as exc:
            return Caller.unknown(f"process {pid} cannot be read: {type(exc).__name__}")
        if not exe:
            return Caller.unknown(f"process {pid} has no executable (kernel thread or exited)", uid=uid)
        try:
            user: Optional[str] = proc.username()
        except (psutil.Error, KeyError):
            user = None
        unit, container = self._cgroup(pid)
        verified = _same_file(f"{self.proc}/{pid}/exe", exe)
        caller = Caller(True, pid, exe, uid, user, cmdline, created, unit, container, exe_verified=verified,
                        preload=preload_of(pid, self.proc))  # fmt: skip
        with self._lock:
            self._described[key] = caller
            while len(self._described) > DESCRIBED:
                self._described.popitem(last=False)
        return caller

    def _cgroup(self, pid: int) -> tuple[Optional[str], Optional[str]]:
        try:
            with open(f"{self.proc}/{pid}/cgroup", encoding="utf-8", errors="replace") as fh:
                return unit_and_container(fh.read())
        except OSError:
            return None, None


# Variables that make the dynamic loader run code of the caller's choosing inside whatever it executes.
PRELOAD_VARIABLES = (b"LD_PRELOAD", b"LD_AUDIT")


def preload_of(pid: int, proc: str = PROC) -> tuple[str, ...]:
    """The loader variables (LD_PRELOAD, LD_AUDIT) set, non-empty, in the environment ``pid`` was started with:
    code the same user injected into an allowed executable acts as that executable. An unreadable environment
    counts as preloaded, because it cannot be shown not to be."""
    try:
        with open(f"{proc}/{pid}/environ", "rb") as fh:
            environ = fh.read(1 << 20)
    except OSError:
        return ("(environment unreadable)",)
    found = []
    for entry in environ.split(b"\0"):
        name, sep, value = entry.partition(b"=")
        if sep and value.strip() and name in PRELOAD_VARIABLES:
            found.append(name.decode())
    return tuple(found)


def _same_file(exe_link: str, path: str) -> bool:
    """Whether ``path`` in the agent's view is the file behind a process's exe link (same device and inode).

    The link resolves to the running file whatever mount namespace it lives in, while the name it shows is only
    a path inside that namespace.
    """
    try:
        running, named = os.stat(exe_link), os.stat(path)
    except OSError:
        return False
    return (running.st_dev, running.st_ino) == (named.st_dev, named.st_ino)


def port_holder(port: int, proc: str = PROC) -> Optional[str]:
    """Who listens on TCP ``port`` (any address, either family), described for an error message; None when no
    readable process does. Used once, when the agent cannot bind its port."""
    index = ProcessIndex(proc)
    for table in ("tcp", "tcp6"):
        try:
            with open(f"{proc}/net/{table}", encoding="ascii") as fh:
                lines = fh.read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 10 or fields[3] != "0A" or int(fields[1].rsplit(":", 1)[1], 16) != port:
                continue  # 0A: TCP_LISTEN
            pid = index.find_pid(int(fields[9]), int(fields[7]))
            if pid is not None:
                return index.describe(pid).describe()
            return f"a socket of uid {fields[7]}"
    return None


def current_comm(pid: int, proc: str = PROC) -> Optional[str]:
    """The kernel's name of what ``pid`` runs (/proc/PID/comm, 15 bytes at most); exec changes it."""
    try:
        with open(f"{proc}/{pid}/comm", "rb") as fh:
            return fh.read().rstrip(b"\n").decode(errors="backslashreplace")
    except OSError:
        return None
