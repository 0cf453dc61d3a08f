"""Cost of identifying the process behind a connection, with many open file descriptors on the host.

Prints figures; not a test. A holder process (another uid) keeps N descriptors open, as a busy daemon would;
a client process (uid 1000) opens 50 connections to a listener here; each accepted connection is identified
the way the agent does it (sock_diag exact lookup, then the pid, then the process description).

    warm: the caller was seen recently (the agent's steady state: daemons call again and again)
    cold: a fresh identifier per connection (no caches: a scan of the socket owner's processes)

    python tests/bench/identity.py [--fds 400 2500 20000]
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "../../agent"))

from imds_agent.identity.resolver import Identifier  # noqa: E402

ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
HOLDER = (
    "import socket, sys, time\n"
    "n = min(int(sys.argv[1]), 19900) // 2\n"
    "keep = [socket.socketpair() for _ in range(n)]\n"
    "print('ready', flush=True)\n"
    "time.sleep(3600)\n"
)
CLIENT = (
    "import socket, sys\n"
    "print('ready', flush=True)\n"
    "keep = []\n"
    "for line in sys.stdin:\n"
    "    keep.append(socket.create_connection(('127.0.0.1', int(sys.argv[1]))))\n"
    "    keep = keep[-50:]\n"
)


def host_fds() -> int:
    total = 0
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                total += len(os.listdir(f"/proc/{pid}/fd"))
            except OSError:
                pass
    return total


def spawn(code: str, uid: int, *args: str) -> subprocess.Popen[str]:
    argv = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "/usr/bin/python3", "-c", code, *args]
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=ENV)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    return proc


def connect(
    client: subprocess.Popen[str], listener: socket.socket, accepted: list[tuple[socket.socket, tuple[str, int]]]
) -> tuple[socket.socket, tuple[str, int]]:
    """Have the client open one more connection (it keeps its last 50) and accept it."""
    assert client.stdin is not None
    client.stdin.write("x\n")
    client.stdin.flush()
    conn, peer = listener.accept()
    accepted.append((conn, peer))
    if len(accepted) > 60:
        accepted.pop(0)[0].close()
    return conn, peer


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * p))] * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--fds", type=int, nargs="*", default=[400, 2500, 20000])
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root (other uids, other users' /proc)")
    print(f"{'host fds':>9} {'warm p50':>10} {'warm p99':>10} {'cold p50':>10} {'cold p99':>10}   (microseconds)")
    for n in args.fds:
        base = host_fds()
        holder = subprocess.Popen(
            ["setpriv", "--reuid=1002", "--regid=1002", "--clear-groups", "/bin/sh", "-c",
             f"ulimit -n {min(n + 64, 20000)}; exec /usr/bin/python3 -c \"{HOLDER}\" {max(0, n - base)}"],
            stdout=subprocess.PIPE, text=True, env=ENV,
        )  # fmt: skip
        assert holder.stdout is not None and holder.stdout.readline().strip() == "ready"
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(128)
        client = spawn(CLIENT, 1000, str(listener.getsockname()[1]))
        assert client.stdin is not None
        accepted: list[tuple[socket.socket, tuple[str, int]]] = []
        try:
            total = host_fds()
            ident = Identifier()
            warm: list[float] = []
            for i in range(300):
                conn, peer = connect(client, listener, accepted)
                caller = ident.identify(peer, conn.getsockname(), None)
                assert caller.known and caller.uid == 1000, caller
                if i >= 10:
                    warm.append(ident.last_cost)
            cold: list[float] = []
            for _ in range(50):
                conn, peer = connect(client, listener, accepted)
                fresh = Identifier()
                started = time.perf_counter()
                assert fresh.identify(peer, conn.getsockname(), None).known
                cold.append(time.perf_counter() - started)
                fresh.close()
            print(f"{total:>9} {pct(warm, .5):>10.0f} {pct(warm, .99):>10.0f} {pct(cold, .5):>10.0f} "
                  f"{pct(cold, .99):>10.0f}   (scans: {ident.index.scans})")  # fmt: skip
        finally:
            for conn, _ in accepted:
                conn.close()
            for proc in (client, holder):
                proc.kill()
                proc.wait()
            listener.close()


if __name__ == "__main__":
    main()
