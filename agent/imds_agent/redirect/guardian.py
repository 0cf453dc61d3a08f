"""Fail-open for backends whose rules cannot belong to a process (iptables).

The agent starts the guardian while it is still root and keeps the write end of a pipe to it. When the agent
stops cleanly it writes "stop" and the guardian exits leaving the rules to the agent's own decision. When the
pipe closes without that word (the agent was killed: SIGKILL, OOM, a crash), the guardian removes the rules so
that the metadata service is reachable again, then exits. It ignores SIGTERM and SIGINT, which systemd and
terminals send to the whole group at once: only the agent's goodbye or its death decides.

    python -m imds_agent.redirect.guardian --backend iptables
"""

from __future__ import annotations

import argparse
import logging
import signal
import subprocess
import sys
from typing import IO, Optional

from ..subproc import python_helper_env
from .registry import BACKEND_NAMES, make_backend

log = logging.getLogger(__name__)


class Guardian:
    """The agent's handle on a running guardian."""

    def __init__(self, proc: subprocess.Popen[bytes]):
        self.proc = proc

    def stop(self) -> None:
        """Tell the guardian the agent is stopping cleanly (it leaves the rules alone) and wait for it."""
        stdin: Optional[IO[bytes]] = self.proc.stdin
        try:
            if stdin is not None:
                stdin.write(b"stop\n")
                stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def start_guardian(backend_name: str) -> Guardian:
    """Start a guardian for ``backend_name``; call while still privileged enough to remove rules."""
    argv = [sys.executable, "-m", "imds_agent.redirect.guardian", "--backend", backend_name]
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, env=python_helper_env(), start_new_session=True)
    log.info("fail-open guardian started (pid %d)", proc.pid)
    return Guardian(proc)


def main(argv: Optional[list[str]] = None) -> int:
    """Wait for the agent's goodbye or death; remove the rules on death."""
    parser = argparse.ArgumentParser(prog="imds-agent-guardian")
    parser.add_argument("--backend", required=True, choices=BACKEND_NAMES)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="imds-agent guardian: %(message)s")
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    words = sys.stdin.buffer.read()  # returns at EOF: the agent closed the pipe or died
    if b"stop" in words.split():
        return 0
    backend = make_backend(args.backend)
    try:
        removed = backend.remove()
    except Exception as exc:
        log.error("the agent died and its redirect rules could not be removed: %s", exc)
        return 1
    finally:
        backend.close()
    log.warning("the agent died; redirect rules %s (fail_mode open)", "removed" if removed else "were already gone")
    return 0


if __name__ == "__main__":
    sys.exit(main())
