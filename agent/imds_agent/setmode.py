"""`imds-agent set-mode audit|enforce`: edit the mode line of agent.yaml in place, safely, then reload the agent.

The file is edited, not rewritten from data, so the operator's comments and layout survive. The result is
validated before it replaces the original (atomically, keeping owner and permissions); an invalid file is never
left behind.
"""

from __future__ import annotations

import os
import re
import signal
from typing import Optional

from . import config as configmod
from . import subproc, yamlsrc
from .atomic import write_atomically
from .errors import AgentError, ConfigError
from .supervisor import PIDFILE

_MODE_LINE = re.compile(r"^(mode\s*:\s*)([^\s#]+)(.*)$")


def edit_mode(text: str, mode: str, path: str) -> str:
    """``text`` with its top-level ``mode:`` set to ``mode`` (appended when absent); validated."""
    doc = yamlsrc.parse(text, path)
    line = doc.lines.get(("mode",)) if isinstance(doc.data, dict) and "mode" in doc.data else None
    lines = text.splitlines(keepends=True)
    if line is None:
        if lines and not lines[-1].endswith("\n"):
            lines[-1] += "\n"
        lines.append(f"mode: {mode}\n")
    else:
        match = _MODE_LINE.match(lines[line - 1].rstrip("\n"))
        if match is None:
            raise ConfigError("the mode value is not on the key's line; edit it by hand", path=path, line=line)
        lines[line - 1] = f"{match.group(1)}{mode}{match.group(3)}\n"
    new = "".join(lines)
    configmod.from_document(yamlsrc.parse(new, path))  # never write a file the agent would refuse
    return new


def reload_agent(pid: Optional[int] = None) -> str:
    """Ask the running agent to reload: the given pid, else systemd, else the pid file. Returns what was done."""
    if pid is not None:
        os.kill(pid, signal.SIGHUP)
        return f"sent SIGHUP to {pid}"
    if os.path.isdir("/run/systemd/system"):
        active = subproc.run(["systemctl", "is-active", "--quiet", "imds-agent.service"], check=False)
        if active.returncode == 0:
            subproc.run(["systemctl", "reload", "imds-agent.service"], timeout=30)
            return "reloaded imds-agent.service"
    try:
        with open(PIDFILE, encoding="ascii") as fh:
            found = int(fh.read().strip())
        os.kill(found, signal.SIGHUP)
        return f"sent SIGHUP to {found} (from {PIDFILE})"
    except (OSError, ValueError):
        return "no running agent found; the new mode applies when it starts"


def set_mode(path: str, mode: str, pid: Optional[int] = None) -> str:
    """Set the mode in ``path`` and reload; return a one-line summary."""
    if mode not in configmod.MODES:
        raise AgentError(f"mode must be audit or enforce, not {mode!r}")
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except FileNotFoundError:
        text = ""
    except OSError as exc:
        raise ConfigError(f"cannot read: {exc.strerror}", path=path) from None
    new = edit_mode(text, mode, path)
    if new != text:
        write_atomically(path, new)
    return f"{path}: mode {mode}; {reload_agent(pid)}"
