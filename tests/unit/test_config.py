from __future__ import annotations

from pathlib import Path

import pytest

from imds_agent import config as configmod
from imds_agent.errors import EXIT_CONFIG, ConfigError


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "agent.yaml"
    path.write_text(text)
    return str(path)


def test_missing_default_file_gives_defaults(tmp_path: Path) -> None:
    config = configmod.load(str(tmp_path / "absent.yaml"))
    assert config == configmod.Config()
    assert config.mode == "audit" and config.listen.port == 968 and config.token.ttl == 21600


def test_missing_explicit_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        configmod.load(str(tmp_path / "absent.yaml"), required=True)


def test_empty_file_gives_defaults(tmp_path: Path) -> None:
    config = configmod.load(write(tmp_path, "# nothing here\n"))
    assert config.upstream == configmod.UpstreamConfig()
    assert config.source is not None and config.source.endswith("agent.yaml")


def test_values_are_read(tmp_path: Path) -> None:
    config = configmod.load(
        write(
            tmp_path,
            "mode: enforce\nlisten: {port: 9000, addresses: [127.0.0.1], allow_unprivileged_port: true}\n"
            "upstream:\n  read_timeout: 2\n  ipv4: 127.0.0.2\ntoken: {ttl: 600, refresh_margin: 60}\n"
            "redirect: {backend: iptables, ipv6: false, fail_mode: closed}\n",
        )
    )
    assert config.mode == "enforce"
    assert config.listen.port == 9000 and config.listen.addresses == ("127.0.0.1",)
    assert config.upstream.read_timeout == 2.0 and isinstance(config.upstream.read_timeout, float)
    assert config.upstream.ipv4 == "127.0.0.2"
    assert config.token.ttl == 600
    assert config.redirect.backend == "iptables" and config.redirect.ipv6 is False
    assert config.redirect.fail_mode == "closed"


@pytest.mark.parametrize(
    ("text", "line", "key", "fragment"),
    [
        ("mode: permissive\n", 1, "mode", "audit or enforce"),
        ("listen:\n  port: 70000\n", 2, "listen.port", "0..65535"),
        ("listen:\n  port: 8775\n", 2, "listen.port", "can be bound by any local user"),
        ("listen:\n  port: '80'\n", 2, "listen.port", "must be an integer"),
        ("token:\n  ttl: 600\n  refresh_margin: 600\n", 3, "token.refresh_margin", "less than ttl"),
        ("token:\n  ttl: 21601\n", 2, "token.ttl", "1..21600"),
        ("upstream:\n  ipv4: fd00:ec2::254\n", 2, "upstream.ipv4", "not an IPv4"),
        ("redirect:\n  enabled: yes please\n", 2, "redirect.enabled", "true or false"),
        ("redirect:\n  backend: pf\n", 2, "redirect.backend", "auto, nftables, iptables, ebpf"),
        ("redirect:\n  fial_mode: open\n", 2, "redirect.fial_mode", "unknown key"),
        ("policy:\n  default: allow-all\n", 2, "policy.default", "must be one of"),
        ("mode: audit\nmode: enforce\n", 2, "mode", "duplicate key"),
        ("listen: 8775\n", 1, "listen", "must be a mapping"),
        ("upstream: {connect_timeout: 0}\n", 1, "upstream.connect_timeout", "> 0"),
        ("user: 998\n", 1, "user", "quote it: '998'"),
        ("listen:\n  port: 900\n  addresses: [127.0.0.1]\n", 3, "listen.addresses", "must include ::1"),
        ("redirect: {ipv6: false}\nlisten: {addresses: ['::1']}\n", 2, "listen.addresses", "include 127.0.0.1"),
        ("containers:\n  interfaces: ['*']\n", 2, "containers.interfaces", "never lo or a bare '*'"),
        ("containers:\n  interfaces: [lo]\n", 2, "containers.interfaces", "never lo"),
        ("containers:\n  interfaces: ['docker0; drop']\n", 2, "containers.interfaces", "not an interface name"),
        ("containers:\n  interfaces: []\n", 2, "containers.interfaces", "at least one"),
        ("containers: {enabled: true, port: 968}\n", 1, "containers.port", "not be the host listener's port"),
    ],
)
def test_errors_name_file_line_and_key(tmp_path: Path, text: str, line: int, key: str, fragment: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        configmod.load(path)
    err = info.value
    assert (err.path, err.line, err.key) == (path, line, key)
    assert fragment in str(err)
    assert str(err).startswith(f"{path}:{line}: {key}: ")
    assert err.exit_code == EXIT_CONFIG


def test_yaml_syntax_error_names_line(tmp_path: Path) -> None:
    path = write(tmp_path, "mode: audit\nlisten: {port: 1\nupstream: x\n")
    with pytest.raises(ConfigError) as info:
        configmod.load(path)
    assert info.value.line is not None and info.value.line >= 2
    assert "invalid YAML" in str(info.value)


def test_top_level_must_be_mapping(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="must be a mapping"):
        configmod.load(write(tmp_path, "- audit\n"))


def test_unreadable_bytes_are_an_error(tmp_path: Path) -> None:
    path = tmp_path / "agent.yaml"
    path.write_bytes(b"mode: \xff\xfe\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        configmod.load(str(path))


def test_config_is_frozen() -> None:
    config = configmod.Config()
    with pytest.raises(AttributeError):
        config.mode = "enforce"  # type: ignore[misc]
    assert config.with_mode("enforce").mode == "enforce" and config.mode == "audit"


def test_upstream_via_is_checked(tmp_path: Path) -> None:
    path = tmp_path / "agent.yaml"
    path.write_text("upstream:\n  via: ipv5\n")
    with pytest.raises(ConfigError, match="upstream.via"):
        configmod.load(str(path), required=True)
    path.write_text("upstream:\n  via: ipv6\n")
    assert configmod.load(str(path), required=True).upstream.via == "ipv6"


def test_listen_addresses_need_only_what_the_redirect_targets(tmp_path: Path) -> None:
    assert configmod.load(write(tmp_path, "listen: {addresses: [127.0.0.1]}\nredirect: {ipv6: false}\n"))
    assert configmod.load(write(tmp_path, "listen: {addresses: [127.0.0.1]}\nredirect: {enabled: false}\n"))
    config = configmod.load(write(tmp_path, "listen: {addresses: ['0:0:0:0:0:0:0:1', 127.0.0.1]}\n"))
    assert config.redirect.ipv6 and "0:0:0:0:0:0:0:1" in config.listen.addresses


def test_the_experimental_ebpf_backend_is_accepted_only_failing_open() -> None:
    assert configmod.RedirectConfig(backend="ebpf").backend == "ebpf"
    with pytest.raises(configmod._FieldError, match="experimental"):
        configmod.RedirectConfig(backend="ebpf", fail_mode="closed")


def test_containers_are_on_by_default_and_cover_the_usual_interfaces() -> None:
    containers = configmod.Config().containers
    assert containers.enabled is True and containers.port == 969
    assert {"docker*", "br-*", "cni*", "eni*"} <= set(containers.interfaces)
