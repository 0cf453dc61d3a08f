"""The agent under many clients through the real redirect (prints figures; not a test).

A sandbox, the agent on nftables, and N closed-loop clients (new connection per request, the SDKs' 1 s timeout)
for D seconds, run as several processes of threads so that the load generator is not the bottleneck. Prints the
agent's answers a second, failures (timeouts, resets, 5xx), latency percentiles, the agent's threads and CPU.

    python tests/bench/load.py [--clients 200] [--seconds 30]   (root)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from imds_agent.sandbox.agentproc import AgentProcess
from imds_agent.sandbox.netns import Sandbox

CLIENT = """
import http.client, json, sys, threading, time
threads, until = int(sys.argv[1]), time.time() + float(sys.argv[2])
lat, fail, lock = [], {}, threading.Lock()
def loop():
    while time.time() < until:
        t = time.perf_counter()
        try:
            c = http.client.HTTPConnection("169.254.169.254", 80, timeout=1)
            c.request("GET", "/latest/meta-data/instance-id"); r = c.getresponse(); r.read(); c.close()
            why = None if r.status == 200 else str(r.status)
        except Exception as exc:
            why = type(exc).__name__
        with lock:
            if why is None:
                lat.append(time.perf_counter() - t)
            else:
                fail[why] = fail.get(why, 0) + 1
ts = [threading.Thread(target=loop) for _ in range(threads)]
[t.start() for t in ts]; [t.join() for t in ts]
print(json.dumps({"lat": lat, "fail": fail}))
"""


def stat(pid: int) -> tuple[float, int]:
    """(CPU seconds, threads) of ``pid``."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    with open(f"/proc/{pid}/status", encoding="ascii") as fh:
        threads = next(int(line.split()[1]) for line in fh if line.startswith("Threads:"))
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"), threads


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--processes", type=int, default=8)
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("needs root (network namespaces)", file=sys.stderr)
        return 77
    with Sandbox() as sbx:
        agent = AgentProcess(sbx, mode="audit", backend="nftables", audit=", rate_per_uid: 0").start()
        try:
            assert agent.proc is not None
            pid = int(sbx.run(["pgrep", "-f", "-n", "imds_agent.cli"]).stdout.split()[0])
            per = max(1, args.clients // args.processes)
            cpu0, _ = stat(pid)
            started = time.monotonic()
            procs = [sbx.spawn([sys.executable, "-c", CLIENT, str(per), str(args.seconds)], uid=65534,
                               stdout=-1) for _ in range(args.processes)]  # fmt: skip
            peak = 0
            while any(p.poll() is None for p in procs):
                peak = max(peak, stat(pid)[1])
                time.sleep(0.5)
            elapsed = time.monotonic() - started
            cpu1, _ = stat(pid)
            lat: list[float] = []
            fail: dict[str, int] = {}
            for p in procs:
                out = json.loads(p.communicate()[0])
                lat += out["lat"]
                for k, v in out["fail"].items():
                    fail[k] = fail.get(k, 0) + v
            lat.sort()
            total = len(lat) + sum(fail.values())
            print(f"{per * args.processes} clients, new connection each, {args.seconds:g} s through the redirect")
            print(f"  answered 200: {len(lat)} ({len(lat) / elapsed:.0f} a second); failed: {sum(fail.values())} "
                  f"({100 * sum(fail.values()) / max(total, 1):.1f}%) {fail}")  # fmt: skip
            if lat:
                p50, p99 = lat[len(lat) // 2], lat[min(len(lat) - 1, int(len(lat) * 0.99))]
                print(f"  latency p50 {p50 * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms")
            print(f"  agent: {cpu1 - cpu0:.1f} s CPU in {elapsed:.1f} s, at most {peak} threads")
        finally:
            agent.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
