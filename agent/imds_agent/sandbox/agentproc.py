"""The agent as a real process inside a Sandbox, started the way systemd starts it (READY over NOTIFY_SOCKET)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from typing import Optional

from .netns import Sandbox

AGENT_UID = 64001  # the sandbox's stand-in for the imds-agent system user


class AgentProcess:
    """One agent run: its config file, its log file, its process; used by `make demo` and privileged tests."""

    def __init__(
        self,
        sbx: Sandbox,
        mode: str = "audit",
        uid: int = AGENT_UID,
        backend: str = "auto",
        fail_mode: str = "open",
        reconcile_interval: float = 1.0,
        extra: str = "",
        policy_default: str = "allow-nonsensitive",
        audit: str = "",
        redirect: str = "",
    ):
        self.sbx = sbx
        self.mode = mode
        self.config = os.path.join(sbx.workdir, "agent.yaml")
        self.log_path = os.path.join(sbx.workdir, "agent.log")
        self.proc: Optional[subprocess.Popen[str]] = None
        self.prefix: list[str] = []  # e.g. setpriv arguments, to start it the way a service manager would
        work = sbx.workdir
        with open(self.config, "w", encoding="utf-8") as fh:
            fh.write(
                f"mode: {mode}\nuser: '{uid}'\n"
                f"redirect: {{backend: {backend}, fail_mode: {fail_mode}, "
                f"reconcile_interval: {reconcile_interval}{redirect}}}\n"
                f"policy: {{dir: {work}/policy.d, default: {policy_default}}}\n"
                f"audit: {{log: {work}/audit/audit.jsonl, state_dir: {work}/state{audit}}}\n" + extra
            )

    def start(self, timeout: float = 15.0, mode: Optional[str] = None) -> AgentProcess:
        """Start the agent (in ``mode`` when given, else the one chosen at construction) and wait for READY=1;
        raise RuntimeError with its log if it exits or stays silent."""
        if mode is not None:
            self.mode = mode
        notify_path = os.path.join(self.sbx.workdir, f"notify-{time.monotonic_ns()}.sock")
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
            notify.bind(notify_path)
            os.chmod(notify_path, 0o666)  # the agent has dropped to its own uid by the time it says READY
            env = {"NOTIFY_SOCKET": notify_path, "PYTHONUNBUFFERED": "1"}
            argv = [*self.prefix, sys.executable, "-m", "imds_agent.cli", "--config", self.config, self.mode]
            with open(self.log_path, "a", encoding="utf-8") as log:
                self.proc = self.sbx.spawn(argv, env=env, stdout=log, stderr=log)
            deadline = time.monotonic() + timeout
            notify.settimeout(0.2)
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"the agent exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
                try:
                    if "READY=1" in notify.recv(4096).decode().split("\n"):
                        return self
                except socket.timeout:
                    continue
        raise RuntimeError(f"the agent did not become ready within {timeout:g}s:\n{self.log()[-3000:]}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        """Send ``sig`` and wait for the exit code."""
        assert self.proc is not None
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(5)

    def log(self) -> str:
        """Everything the agent wrote to stderr so far."""
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as fh:
                return fh.read()
        except FileNotFoundError:
            return ""

    def cli(self, *args: str, check: bool = False) -> subprocess.CompletedProcess[str]:
        """Run `imds-agent --config <this config> ARGS` in the host namespace as root."""
        return self.sbx.run([sys.executable, "-m", "imds_agent.cli", "--config", self.config, *args], check=check)
