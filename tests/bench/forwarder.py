"""Latency the agent adds over a direct request to the same metadata emulator (prints figures; not a test).

The emulator and the agent run as separate processes on loopback, as in production, so the client's GIL does
not share their work. The direct baseline sends the same GET with a valid token (IMDSv1 is disabled upstream);
through the agent the client sends a plain IMDSv1 GET and the agent injects its cached token.

    python tests/bench/forwarder.py [--requests N]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

PATH = "/latest/meta-data/instance-id"
ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "PYTHONPATH": os.path.join(os.path.dirname(__file__), "../../agent")}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def processes(tmp: str) -> Iterator[tuple[int, int, int]]:
    emu_port, agent_port = free_port(), free_port()
    emu = subprocess.Popen(
        [sys.executable, "-m", "imds_agent.sandbox.emulator", "--listen", f"127.0.0.1:{emu_port}", "--tokens",
         "required", "--control", os.path.join(tmp, "emu.sock")],
        stdout=subprocess.PIPE, env=ENV,
    )  # fmt: skip
    assert emu.stdout is not None
    json.loads(emu.stdout.readline())
    config = os.path.join(tmp, "agent.yaml")
    with open(config, "w") as fh:
        fh.write(
            f"user: '{os.getuid()}'\n"
            f"listen: {{port: {agent_port}, addresses: [127.0.0.1], allow_unprivileged_port: true}}\n"
            f"upstream: {{ipv4: 127.0.0.1, port: {emu_port}}}\nredirect: {{enabled: false}}\n"
            f"policy: {{dir: {tmp}/policy.d, default: allow}}\n"
            f"audit: {{log: {tmp}/audit.jsonl, state_dir: {tmp}}}\n"
        )
    agent = subprocess.Popen(
        [sys.executable, "-m", "imds_agent.cli", "--config", config, "audit"], env=ENV, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                socket.create_connection(("127.0.0.1", agent_port), 0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline or agent.poll() is not None:
                    raise SystemExit("the agent did not start") from None
                time.sleep(0.05)
        yield emu_port, agent_port, agent.pid
    finally:
        for proc in (agent, emu):
            proc.terminate()
            proc.wait(10)


def token(port: int) -> str:
    conn = http.client.HTTPConnection("127.0.0.1", port)
    conn.request("PUT", "/latest/api/token", headers={"X-aws-ec2-metadata-token-ttl-seconds": "21600"})
    return conn.getresponse().read().decode()


def run(port: int, headers: dict[str, str], n: int, keepalive: bool) -> list[float]:
    out: list[float] = []
    conn = http.client.HTTPConnection("127.0.0.1", port)
    for _ in range(n):
        if not keepalive:
            conn = http.client.HTTPConnection("127.0.0.1", port)
        start = time.perf_counter()
        conn.request("GET", PATH, headers=headers)
        resp = conn.getresponse()
        resp.read()
        out.append(time.perf_counter() - start)
        if resp.status != 200:
            raise SystemExit(f"unexpected status {resp.status}")
        if not keepalive:
            conn.close()
    return out


def concurrent(port: int, headers: dict[str, str], n: int, keepalive: bool, workers: int) -> list[float]:
    results: list[list[float]] = [[] for _ in range(workers)]

    def work(i: int) -> None:
        results[i] = run(port, headers, n // workers, keepalive)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return [x for r in results for x in r]


def memory(pid: int) -> str:
    """The agent's resident set now and its peak, from /proc."""
    with open(f"/proc/{pid}/status", encoding="ascii") as fh:
        fields = dict(line.split(":", 1) for line in fh)
    rss, peak = (int(fields[k].split()[0]) / 1024 for k in ("VmRSS", "VmHWM"))
    return f"RSS {rss:.1f} MiB (peak {peak:.1f} MiB), {fields['Threads'].strip()} threads"


def cpu_seconds(pid: int) -> float:
    """The agent's CPU time so far (user + system), from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * p))] * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=4000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, processes(tmp) as (emu_port, agent_port, agent_pid):
        direct_headers = {"X-aws-ec2-metadata-token": token(emu_port)}
        started = memory(agent_pid)
        head = f"{'mode':<28}{'conc':>5}{'direct p50':>12}{'p99':>8}"
        print(f"{head}{'agent p50':>11}{'p99':>8}{'added p50':>11}{'p99':>8}{'agent rps':>11}{'CPU/req':>10}")
        for keepalive in (True, False):
            for workers in (1, 16):
                # Warm both paths (pool, token, thread start-up) before measuring.
                concurrent(emu_port, direct_headers, 200, keepalive, 1)
                concurrent(agent_port, {}, 200, keepalive, 1)
                direct = concurrent(emu_port, direct_headers, args.requests, keepalive, workers)
                cpu, wall = cpu_seconds(agent_pid), time.monotonic()
                agent = concurrent(agent_port, {}, args.requests, keepalive, workers)
                cpu, wall = cpu_seconds(agent_pid) - cpu, time.monotonic() - wall
                rps, per_request = args.requests / wall, cpu / args.requests * 1e6
                d50, d99, a50, a99 = pct(direct, 0.5), pct(direct, 0.99), pct(agent, 0.5), pct(agent, 0.99)
                label = "keep-alive" if keepalive else "new connection per request"
                print(
                    f"{label:<28}{workers:>5}{d50:>10.3f}ms{d99:>6.2f}ms{a50:>9.3f}ms{a99:>6.2f}ms"
                    f"{a50 - d50:>9.3f}ms{a99 - d99:>6.2f}ms{rps:>11.0f}{per_request:>8.0f}us"
                )
        print(
            f"({args.requests} requests per row; added = agent - direct at the same percentile; CPU/req = the "
            "agent's user+system CPU over the row, per request)"
        )
        print(f"agent memory: at start {started}; after the runs {memory(agent_pid)}")


if __name__ == "__main__":
    main()
