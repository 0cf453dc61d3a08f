"""Errors carry their exit code, and configuration errors say file, line and key."""

from __future__ import annotations

from imds_agent import errors
from imds_agent.errors import ConfigError, PrivilegeError, RedirectError, UnsupportedError, UpstreamError


def test_configuration_errors_render_file_line_and_key() -> None:
    assert str(ConfigError("must be 1..65535", path="/etc/a.yaml", line=3, key="listen.port")) == (
        "/etc/a.yaml:3: listen.port: must be 1..65535"
    )
    assert str(ConfigError("no such file", path="/etc/a.yaml")) == "/etc/a.yaml: no such file"
    assert str(ConfigError("bad")) == "<config>: bad"


def test_each_kind_of_error_has_its_exit_code() -> None:
    assert ConfigError("x").exit_code == errors.EXIT_CONFIG == 78
    assert UnsupportedError("x").exit_code == errors.EXIT_UNSUPPORTED == 69
    assert PrivilegeError("x").exit_code == errors.EXIT_PERMISSION == 77
    assert RedirectError("x").exit_code == errors.EXIT_RUNTIME == 70
    assert UpstreamError("refused", 502).status == 502
