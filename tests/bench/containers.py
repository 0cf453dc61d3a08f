"""What identifying a container's connection costs, against a host process's (prints figures; not a test).

A sandbox with N network namespaces standing for containers behind the host's bridge, the agent with
`containers.enabled` on nftables, and a client making new connections from one container (or from the host). The
figures are the agent's own `identify_ms` from its audit records: the socket search in the containers' namespaces
plus the process lookup, per connection.

    python tests/bench/containers.py [--requests N] [--namespaces N] [--backend nftables|iptables]   (root)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

from imds_agent.sandbox.agentproc import AgentProcess
from imds_agent.sandbox.netns import Sandbox, wait_for

CLIENT = (
    "import http.client, sys\n"
    "for _ in range(int(sys.argv[1])):\n"
    "    c = http.client.HTTPConnection('169.254.169.254', 80, timeout=5)\n"
    "    c.request('GET', '/latest/meta-data/instance-id'); r = c.getresponse(); r.read(); c.close()\n"
    "    assert r.status == 200, r.status\n"
)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--namespaces", type=int, default=20)
    parser.add_argument("--backend", action="append", choices=("nftables", "iptables"), help="default: both")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("needs root (network namespaces)", file=sys.stderr)
        return 77
    for backend in args.backend or ["nftables", "iptables"]:
        bench(backend, args.requests, args.namespaces)
    return 0


def bench(backend: str, requests: int, namespaces: int) -> None:
    """One sandbox with ``namespaces`` containers and the agent on ``backend``; print the rows."""
    with Sandbox() as sbx:
        for n in range(namespaces):
            sbx.add_container(f"c{n}", f"172.30.0.{n + 2}")
        # Something running in every namespace, as every container has its init.
        for n in range(namespaces):
            sbx.spawn(["sleep", "600"], ns=f"c{n}")
        agent = AgentProcess(sbx, mode="audit", backend=backend, extra="containers: {enabled: true}\n",
                             audit=", rate_per_uid: 0").start()  # fmt: skip
        log = os.path.join(sbx.workdir, "audit", "audit.jsonl")
        try:
            print(f"\n{backend}: {namespaces} container namespaces, {requests} new connections per row")
            print(f"{'from':<36} {'identify p50':>13} {'p99':>9}")
            done = 0
            for label, ns in (("the host", "host"), ("a container (last one made)", f"c{namespaces - 1}"),
                              ("a container (first one made)", "c0")):  # fmt: skip
                sbx.run([sys.executable, "-c", CLIENT, str(requests)], ns=ns, uid=65534, check=True, timeout=300)
                done += requests
                wait_for(lambda want=done: _count(log) >= want, 10)
                with open(log, encoding="utf-8") as fh:
                    rows = [json.loads(line) for line in fh][-requests:]
                costs = [float(r["identify_ms"]) for r in rows if r.get("identified")]
                if len(costs) < requests:
                    why = {str(r.get("unidentified_reason")) for r in rows if not r.get("identified")}
                    print(f"  {requests - len(costs)} unidentified: {'; '.join(sorted(why))}")
                print(f"{label:<36} {statistics.median(costs):>10.3f} ms {percentile(costs, 0.99):>6.3f} ms")
        finally:
            agent.stop()


def _count(path: str) -> int:
    try:
        with open(path, encoding="utf-8") as fh:
            return sum(1 for _ in fh)
    except FileNotFoundError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
