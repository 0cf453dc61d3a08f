"""The agent's exception hierarchy and the exit code the CLI maps each kind to.

Exit codes are part of the interface: the systemd unit lists EXIT_CONFIG in RestartPreventExitStatus so that a
broken configuration does not turn into a restart loop.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILURE = 1  # an unexpected error; systemd may restart
EXIT_CONFIG = 78  # EX_CONFIG from sysexits.h: the configuration or policy is invalid
EXIT_UNSUPPORTED = 69  # EX_UNAVAILABLE: the kernel or host lacks something the agent needs
EXIT_PERMISSION = 77  # EX_NOPERM: not root / missing capabilities
EXIT_RUNTIME = 70  # EX_SOFTWARE: the agent failed while running (e.g. could not listen)


class AgentError(Exception):
    """Base of every error the agent reports to an operator as a one-line message."""

    exit_code = EXIT_FAILURE


class ConfigError(AgentError):
    """The configuration (agent.yaml or a policy file) is invalid.

    ``path``, ``line`` and ``key`` locate the problem; ``str()`` renders ``file:line: key: message``.
    """

    exit_code = EXIT_CONFIG

    def __init__(self, message: str, path: str | None = None, line: int | None = None, key: str | None = None):
        self.message = message
        self.path = path
        self.line = line
        self.key = key
        super().__init__(self.render())

    def render(self) -> str:
        where = self.path or "<config>"
        if self.line is not None:
            where = f"{where}:{self.line}"
        if self.key:
            return f"{where}: {self.key}: {self.message}"
        return f"{where}: {self.message}"


class UnsupportedError(AgentError):
    """The host lacks a kernel feature, binary or library the agent needs; the message names what is missing."""

    exit_code = EXIT_UNSUPPORTED


class PrivilegeError(AgentError):
    """The agent lacks a privilege (root, a capability) needed for the requested action."""

    exit_code = EXIT_PERMISSION


class RedirectError(AgentError):
    """Installing, checking or removing kernel redirection rules failed."""

    exit_code = EXIT_RUNTIME


class UpstreamError(AgentError):
    """The metadata service could not be reached or did not answer in time.

    ``status`` is the HTTP status the proxy answers with (502 or 504); the message names the cause.
    """

    exit_code = EXIT_RUNTIME

    def __init__(self, message: str, status: int = 502):
        self.status = status
        super().__init__(message)


class TokenError(UpstreamError):
    """No valid IMDSv2 session token could be obtained."""


class ListenError(AgentError):
    """The agent cannot listen where it must (the port is taken, the address is missing); names the cause."""

    exit_code = EXIT_RUNTIME


class PersistenceError(AgentError):
    """The records cannot be kept and the configuration says they must be (audit.require_persistence)."""

    exit_code = EXIT_RUNTIME
