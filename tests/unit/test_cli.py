"""The command line: every subcommand parses to its function, bad command lines exit 2, errors map to their exit
codes, and `rules remove --if-fail-open` keeps or removes rules as fail_mode says."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from imds_agent import cli
from imds_agent.config import DEFAULT_PATH
from imds_agent.errors import EXIT_CONFIG, EXIT_OK

COMMANDS = {
    ("run",): cli.cmd_run,
    ("audit",): cli.cmd_run,
    ("enforce",): cli.cmd_run,
    ("check-config",): cli.cmd_check_config,
    ("rules", "show"): cli.cmd_rules_show,
    ("rules", "apply"): cli.cmd_rules_apply,
    ("rules", "remove"): cli.cmd_rules_remove,
    ("report",): cli.cmd_report,
    ("suggest",): cli.cmd_suggest,
    ("explain", "--exe", "/usr/bin/curl", "--uid", "1000", "--path", "/latest/meta-data/"): cli.cmd_explain,
    ("set-mode", "enforce"): cli.cmd_set_mode,
    ("version",): cli.cmd_version,
}


@pytest.mark.parametrize("argv", list(COMMANDS))
def test_each_subcommand_parses_to_its_function(argv: tuple[str, ...]) -> None:
    args = cli.build_parser().parse_args(["--config", "/x/agent.yaml", *argv])
    assert args.func is COMMANDS[argv] and args.config == "/x/agent.yaml"


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["rules"],
        ["rules", "remove", "--backend", "ebpf-not-yet"],
        ["set-mode", "permissive"],
        ["explain", "--exe", "/usr/bin/curl", "--path", "/"],  # --uid is required
        ["report", "--hours", "many"],
        ["frobnicate"],
    ],
)
def test_bad_command_lines_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2 and "usage:" in capsys.readouterr().err


def test_rules_options_name_only_real_backends() -> None:
    args = cli.build_parser().parse_args(["rules", "remove", "--backend", "iptables", "--if-fail-open"])
    assert (args.backend, args.if_fail_open) == ("iptables", True)


def test_an_invalid_configuration_exits_78_naming_the_file_and_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "agent.yaml"
    bad.write_text("mode: enforce\nlisten:\n  port: eighty\n")
    assert cli.main(["--config", str(bad), "check-config"]) == EXIT_CONFIG
    err = capsys.readouterr().err
    assert str(bad) in err and ":3" in err and "port" in err


class FakeBackend:
    def __init__(self, name: str, removed: list[str]) -> None:
        self.name = name
        self.removed = removed

    def is_supported(self) -> bool:
        return True

    def unsupported_reason(self) -> str:
        return ""

    def remove(self) -> bool:
        self.removed.append(self.name)
        return True

    def close(self) -> None:
        pass


def remove_with(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, config_text: str | None) -> list[str]:
    removed: list[str] = []
    monkeypatch.setattr(cli, "make_backend", lambda name: FakeBackend(name, removed))
    path = tmp_path / "agent.yaml"
    if config_text is not None:
        path.write_text(config_text)
    args = argparse.Namespace(config=str(path), backend=None, if_fail_open=True)
    assert cli.cmd_rules_remove(args) == EXIT_OK
    return removed


def test_if_fail_open_keeps_the_rules_when_failing_closed(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert remove_with(monkeypatch, tmp_path, "redirect:\n  fail_mode: closed\n") == []


def test_if_fail_open_removes_every_backends_rules_when_failing_open(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    assert remove_with(monkeypatch, tmp_path, "redirect:\n  fail_mode: open\n") == ["nftables", "iptables"]


def test_if_fail_open_removes_the_rules_when_the_configuration_is_broken_or_gone(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert remove_with(monkeypatch, tmp_path, "redirect: [unclosed\n") == ["nftables", "iptables"]
    assert "cannot read the configuration" in capsys.readouterr().out
    (tmp_path / "agent.yaml").unlink()
    assert remove_with(monkeypatch, tmp_path, None) == ["nftables", "iptables"]


def test_explain_answers_allow_or_deny_with_its_exit_code(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    policy = tmp_path / "policy.d"
    policy.mkdir()
    (policy / "10-ssm.yaml").write_text("rules:\n  - name: ssm\n    exe: /usr/bin/amazon-ssm-agent\n"
                                        "    sensitive: [credentials]\n")  # fmt: skip
    config = tmp_path / "agent.yaml"
    config.write_text(f"policy:\n  dir: {policy}\n")
    creds = "/latest/meta-data/iam/security-credentials/role"
    base = ["--config", str(config), "explain", "--uid", "0", "--user", "root", "--path", creds]
    assert cli.main([*base, "--exe", "/usr/bin/amazon-ssm-agent"]) == 0
    assert "allow: /usr/bin/amazon-ssm-agent" in capsys.readouterr().out
    assert cli.main([*base, "--exe", "/usr/bin/curl"]) == 1
    out = capsys.readouterr().out
    assert out.startswith("deny: /usr/bin/curl") and "default: allow-nonsensitive" in out


def test_check_config_warns_where_the_trust_in_a_rule_is_weaker(tmp_path: Path) -> None:
    from imds_agent.policy.model import Policy, Rule

    scope = tmp_path / "ptrace_scope"
    scope.write_text("0\n")
    loose = Rule("by-argv", ("/usr/bin/python3",), "50-x.yaml:2", cmdline="*exporter.py*")
    pinned = Rule("by-argv-and-uid", ("/usr/bin/python3",), "50-x.yaml:9", uids=(998,), cmdline="*exporter.py*")
    warnings = cli.trust_warnings(Policy((loose, pinned)), str(scope))
    assert len(warnings) == 2 and "ptrace_scope is 0" in warnings[0]
    assert "rule by-argv [50-x.yaml:2] matches on cmdline without uid" in warnings[1]
    scope.write_text("1\n")
    assert len(cli.trust_warnings(Policy((pinned,)), str(scope))) == 0
    assert "Yama is not enabled" in cli.trust_warnings(Policy(), str(tmp_path / "absent"))[0]


def test_explain_says_a_preloaded_caller_misses_a_rule_that_refuses_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    policy = tmp_path / "policy.d"
    policy.mkdir()
    (policy / "10-curl.yaml").write_text("rules:\n  - name: curl\n    exe: /usr/bin/curl\n"
                                         "    sensitive: [credentials]\n    refuse_preload: true\n")  # fmt: skip
    config = tmp_path / "agent.yaml"
    config.write_text(f"policy:\n  dir: {policy}\n")
    base = ["--config", str(config), "explain", "--exe", "/usr/bin/curl", "--uid", "0", "--user", "root", "--path",
            "/latest/meta-data/iam/security-credentials/r"]  # fmt: skip
    assert cli.main(base) == 0
    assert cli.main([*base, "--preload"]) == 1
    assert "default: allow-nonsensitive" in capsys.readouterr().out


def test_config_is_taken_before_or_after_the_subcommand() -> None:
    parser = cli.build_parser()
    assert parser.parse_args(["report", "--config", "/a.yaml"]).config == "/a.yaml"
    assert parser.parse_args(["--config", "/a.yaml", "report"]).config == "/a.yaml"
    assert parser.parse_args(["--config", "/a.yaml", "rules", "show", "--config", "/b.yaml"]).config == "/b.yaml"
    assert parser.parse_args(["report"]).config == DEFAULT_PATH


def test_explain_takes_the_container_a_caller_runs_in(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    policy = tmp_path / "policy.d"
    policy.mkdir()
    (policy / "50-pods.yaml").write_text(
        'rules:\n  - name: exporter\n    container: {image: "registry.example.com/payments/*:*", labels: {team: b*}}\n'
        "    pod: {namespace: payments}\n    sensitive: [credentials]\n"
    )
    config = tmp_path / "agent.yaml"
    config.write_text(f"policy:\n  dir: {policy}\n")
    base = ["--config", str(config), "explain", "--exe", "/app/exporter", "--uid", "1000", "--path",
            "/latest/meta-data/iam/security-credentials/r", "--container-image",
            "registry.example.com/payments/exporter:1.4", "--pod-namespace", "payments"]  # fmt: skip
    assert cli.main([*base, "--label", "team=billing", "--container-runtime", "containerd"]) == 0
    out = capsys.readouterr().out
    assert (
        "  in: containerd container (explain), image registry.example.com/payments/exporter:1.4, pod payments/" in out
    )
    assert "decided by: exporter (" in out
    assert cli.main(base) == 1  # no team label: the rule passes it by
    out = capsys.readouterr().out
    assert "not exporter [" in out and "the container's label team does not match" in out
    # Without container options the same path is a host file, which a container rule never matches.
    assert cli.main(base[:9]) == 1


def test_explain_refuses_a_label_that_is_not_key_value(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.build_parser().parse_args(["explain", "--exe", "/x", "--uid", "0", "--path", "/", "--label", "team"])
    assert info.value.code == 2 and "invalid label value: 'team'" in capsys.readouterr().err


def test_check_config_shows_container_rules_and_warns_that_a_service_account_never_matches(tmp_path: Path) -> None:
    from imds_agent.policy.model import ANY_EXE, Policy, Rule, WorkloadPattern

    scope = tmp_path / "ptrace_scope"
    scope.write_text("1\n")
    by_account = Rule("by-sa", ANY_EXE, "50-x.yaml:2", workload=WorkloadPattern(service_account="exporter"))
    by_image = Rule("by-image", ANY_EXE, "50-x.yaml:5", workload=WorkloadPattern(image="registry.example.com/**"))
    warnings = cli.trust_warnings(Policy((by_account, by_image)), str(scope))
    assert warnings == ["rule by-sa [50-x.yaml:2] names a service account, which no runtime's state records (only "
                        "the pod's token, a credential never read): it never matches"]  # fmt: skip
