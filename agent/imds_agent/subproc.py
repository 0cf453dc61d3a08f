"""The one way the agent runs commands: argv lists, a fixed PATH, a timeout, errors that say what happened."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from typing import Optional

from .errors import AgentError

PATH = "/usr/sbin:/usr/bin:/sbin:/bin"


class ProcessError(AgentError):
    """A command failed: carries the argv, the exit code and (trimmed) stderr."""

    def __init__(self, argv: Sequence[str], code: Optional[int], stderr: str, reason: str = ""):
        self.argv = list(argv)
        self.code = code
        self.stderr = stderr.strip()[-2000:]
        what = reason or f"exited with {code}"
        lines = [line.strip() for line in self.stderr.splitlines() if line.strip()]
        # nft and friends end with a caret line under the offending word; the message is the "Error" line.
        errors = [line for line in lines if "error" in line.lower()]
        detail = f": {(errors or lines)[-1]}" if lines else ""
        super().__init__(f"{' '.join(self.argv[:4])}{' ...' if len(self.argv) > 4 else ''} {what}{detail}")


def python_helper_env() -> dict[str, str]:
    """The whole environment of a helper process that runs this package's own Python code (the iptables worker,
    the guardian): the fixed PATH, this interpreter's module path, and no bytecode written into the installed
    tree. Nothing else of the agent's environment is passed on."""
    return {
        "PATH": PATH,
        "LANG": "C",
        "PYTHONPATH": os.pathsep.join(p for p in sys.path if p),
        "PYTHONDONTWRITEBYTECODE": "1",
    }


def run(
    argv: Sequence[str],
    timeout: float = 30,
    check: bool = True,
    env: Optional[Mapping[str, str]] = None,
    input: Optional[str] = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` with PATH fixed and LANG=C (``env`` adds to that), capturing text output."""
    full_env = {"PATH": PATH, "LANG": "C"}
    full_env.update(env or {})
    try:
        proc = subprocess.run(
            list(argv), env=full_env, timeout=timeout, capture_output=True, text=True, input=input, check=False
        )
    except subprocess.TimeoutExpired as exc:
        stderr = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else (exc.stderr or "")
        raise ProcessError(argv, None, stderr, f"timed out after {timeout:g}s") from None
    except OSError as exc:
        raise ProcessError(argv, None, "", f"could not be started: {exc.strerror or exc}") from None
    if check and proc.returncode != 0:
        raise ProcessError(argv, proc.returncode, proc.stderr)
    return proc
