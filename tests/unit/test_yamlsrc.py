"""YAML that remembers lines: values keep their line numbers, duplicate keys and syntax errors name the line."""

from __future__ import annotations

import pytest

from imds_agent import yamlsrc
from imds_agent.errors import ConfigError


def test_every_key_knows_its_line_and_errors_point_at_it() -> None:
    doc = yamlsrc.parse("mode: audit\nlisten:\n  port: 8775\nrules:\n  - name: a\n", "/etc/a.yaml")
    assert doc.data["listen"]["port"] == 8775
    assert doc.line_of(("listen", "port")) == 3 and doc.line_of(("rules", 0, "name")) == 5
    assert doc.line_of(("listen", "missing")) == 2  # the nearest ancestor's
    assert str(doc.error(("listen", "port"), "too low")) == "/etc/a.yaml:3: listen.port: too low"


def test_a_duplicate_key_is_refused_with_its_line() -> None:
    with pytest.raises(ConfigError) as info:
        yamlsrc.parse("mode: audit\nmode: enforce\n", "/etc/a.yaml")
    assert info.value.line == 2 and "duplicate" in str(info.value)


def test_a_syntax_error_names_the_file_and_line() -> None:
    with pytest.raises(ConfigError) as info:
        yamlsrc.parse("a: 1\nb: [unclosed\n", "/etc/a.yaml")
    assert info.value.path == "/etc/a.yaml" and info.value.line is not None and info.value.line >= 2
