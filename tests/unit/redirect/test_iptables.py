"""The iptables backend without a kernel: how the state a worker reads back is compared with the spec, and how
worker answers become the backend protocol. The workers (python-iptables in a process of their own) are replaced
by canned answers; what iptworker reads from python-iptables objects is checked with fakes of those objects."""

from __future__ import annotations

import json
import subprocess
from typing import Any, Optional

import pytest

from imds_agent import subproc
from imds_agent.errors import RedirectError
from imds_agent.redirect import iptables, iptrules, iptworker
from imds_agent.redirect.base import IPTABLES_CHAIN, RedirectSpec, State
from imds_agent.redirect.iptables import IptablesBackend

SPEC = RedirectSpec(exempt_uid=990, listen_port=8775)
WANTED = iptrules.build_rules(SPEC)


def found(
    family: str = "ipv4",
    chain: bool = True,
    jumps: int = 1,
    first: bool = True,
    change: Optional[dict[str, str]] = None,
) -> dict[str, Any]:
    """What a worker's ``state`` reports for a family: our rules (with counters) unless told otherwise."""
    rules = [dict(r, **(change or {}), packets=3, bytes=180, target="DNAT") for r in WANTED[family]["rules"]]
    return {"chain": chain, "jumps": jumps, "jump_first": first, "rules": rules if chain else []}


def differences(family: str, state: dict[str, Any], wanted: Optional[dict[str, Any]]) -> list[str]:
    return IptablesBackend._differences(family, state, wanted)


# --- the comparison -------------------------------------------------------------------------------------------------


def test_the_installed_rules_match_the_spec_whatever_their_counters() -> None:
    assert differences("ipv4", found(), WANTED["ipv4"]) == []
    assert differences("ipv6", found("ipv6"), WANTED["ipv6"]) == []


def test_a_missing_chain_and_jump_are_reported() -> None:
    assert differences("ipv4", found(chain=False, jumps=0), WANTED["ipv4"]) == [
        "ipv4 chain IMDS_AGENT is missing",
        "ipv4 jump from OUTPUT is missing",
    ]


def test_a_jump_that_is_doubled_or_not_first_is_reported() -> None:
    assert differences("ipv4", found(jumps=2), WANTED["ipv4"]) == ["ipv4 OUTPUT jumps to IMDS_AGENT 2 times"]
    assert differences("ipv4", found(first=False), WANTED["ipv4"]) == ["ipv4 jump is not the first rule in OUTPUT"]


@pytest.mark.parametrize(
    "change",
    [{"uid_owner": "!0"}, {"to": "127.0.0.1:9999"}, {"dport": "8080"}, {"dst": "169.254.169.253/32"}],
    ids=["uid", "to", "dport", "dst"],
)
def test_a_changed_rule_is_reported_with_what_is_wanted(change: dict[str, str]) -> None:
    assert differences("ipv4", found(change=change), WANTED["ipv4"]) == [
        "ipv4 rules differ: has 1, wants '-A IMDS_AGENT -d 169.254.169.254/32 -p tcp -m tcp --dport 80 "
        "-m owner ! --uid-owner 990 -m comment --comment imds_agent -j DNAT --to-destination 127.0.0.1:8775'"
    ]


def test_an_empty_or_doubled_chain_is_reported() -> None:
    empty = dict(found(), rules=[])
    doubled = dict(found(), rules=found()["rules"] * 2)
    for state, count in ((empty, 0), (doubled, 2)):
        (detail,) = differences("ipv4", state, WANTED["ipv4"])
        assert detail.startswith(f"ipv4 rules differ: has {count}, wants '-A IMDS_AGENT ")


def test_rules_of_a_family_that_is_not_wanted_are_reported() -> None:
    assert differences("ipv6", found("ipv6"), None) == ["ipv6 rules are installed but not wanted"]
    assert differences("ipv6", found("ipv6", chain=False, jumps=1), None) == ["ipv6 rules are installed but not wanted"]
    assert differences("ipv6", found("ipv6", chain=False, jumps=0), None) == []


# --- the backend over canned worker answers -------------------------------------------------------------------------


class Workers:
    """Stands in for iptables._worker: answers per (family, op), records every call."""

    def __init__(self, answers: dict[tuple[str, str], Any]):
        self.answers = answers
        self.calls: list[tuple[str, str, Optional[dict[str, Any]]]] = []

    def __call__(self, family: str, op: str, payload: Optional[dict[str, Any]] = None) -> dict[str, Any]:
        self.calls.append((family, op, payload))
        answer = self.answers.get((family, op), {})
        if isinstance(answer, Exception):
            raise answer
        return dict(answer)


@pytest.fixture
def workers(monkeypatch: pytest.MonkeyPatch) -> Workers:
    fake = Workers({})
    monkeypatch.setattr(iptables, "_worker", fake)
    return fake


def test_check_of_matching_families_is_present_with_counters(workers: Workers) -> None:
    workers.answers = {("ipv4", "state"): found(), ("ipv6", "state"): found("ipv6")}
    result = IptablesBackend().check(SPEC)
    assert (result.state, result.details, result.owned) == (State.PRESENT, (), False)
    assert [(r.family, r.packets, r.bytes) for r in result.rules] == [("ipv4", 3, 180), ("ipv6", 3, 180)]
    assert result.rules[1].text == iptrules.render(WANTED["ipv6"]["rules"][0])


def test_check_with_nothing_installed_is_absent(workers: Workers) -> None:
    nothing = found(chain=False, jumps=0)
    workers.answers = {("ipv4", "state"): nothing, ("ipv6", "state"): nothing}
    result = IptablesBackend().check(SPEC)
    assert (result.state, result.details) == (State.ABSENT, ("chain IMDS_AGENT is missing",))


def test_check_with_one_family_missing_is_partial(workers: Workers) -> None:
    workers.answers = {("ipv4", "state"): found(), ("ipv6", "state"): found("ipv6", chain=False, jumps=0)}
    result = IptablesBackend().check(SPEC)
    assert result.state == State.PARTIAL
    assert result.details == ("ipv6 chain IMDS_AGENT is missing", "ipv6 jump from OUTPUT is missing")


def test_check_without_a_spec_only_reports_what_is_installed(workers: Workers) -> None:
    workers.answers = {("ipv4", "state"): found(jumps=3), ("ipv6", "state"): found("ipv6", chain=False, jumps=0)}
    result = IptablesBackend().check(None)
    assert (result.state, result.details, len(result.rules)) == (State.PRESENT, (), 1)


def test_apply_sends_each_wanted_family_and_removes_an_unwanted_one(workers: Workers) -> None:
    IptablesBackend().apply(RedirectSpec(exempt_uid=990, listen_port=8775, with_ipv6=False), owned=True)
    assert workers.calls == [("ipv4", "apply", WANTED["ipv4"]), ("ipv6", "remove", None)]


def test_remove_reports_whether_either_family_had_rules(workers: Workers) -> None:
    workers.answers = {("ipv4", "remove"): {"removed": False}, ("ipv6", "remove"): {"removed": True}}
    assert IptablesBackend().remove() is True
    workers.answers = {("ipv4", "remove"): {"removed": False}, ("ipv6", "remove"): {"removed": False}}
    assert IptablesBackend().remove() is False


def test_remove_on_a_host_without_ipv6_is_not_an_error(workers: Workers) -> None:
    workers.answers = {
        ("ipv4", "remove"): {"removed": True},
        ("ipv6", "remove"): RedirectError("iptables ipv6 remove: IPTCError: Address family not supported by protocol"),
    }
    assert IptablesBackend().remove() is True
    workers.answers[("ipv4", "remove")] = RedirectError("iptables ipv4 remove: Address family not supported")
    with pytest.raises(RedirectError):
        IptablesBackend().remove()


def test_an_unsupported_owner_match_names_the_kernel_option(workers: Workers) -> None:
    workers.answers = {("ipv4", "probe"): RedirectError("iptables ipv4 probe: XTablesError: can't find match owner")}
    backend = IptablesBackend()
    assert backend.is_supported() is False
    assert backend.unsupported_reason().endswith("(kernel needs CONFIG_NETFILTER_XT_MATCH_OWNER)")


# --- the worker call ------------------------------------------------------------------------------------------------


def answer_with(monkeypatch: pytest.MonkeyPatch, stdout: str) -> list[dict[str, Any]]:
    runs: list[dict[str, Any]] = []

    def run(argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        runs.append(dict(kwargs, argv=argv))
        return subprocess.CompletedProcess(argv, 0, stdout, "")

    monkeypatch.setattr(subproc, "run", run)
    return runs


def test_the_worker_gets_the_payload_as_json_and_its_last_line_is_the_answer(monkeypatch: pytest.MonkeyPatch) -> None:
    runs = answer_with(monkeypatch, 'libxtables noise\n{"ok": true, "applied": 1}\n')
    assert iptables._worker("ipv6", "apply", WANTED["ipv6"]) == {"ok": True, "applied": 1}
    (call,) = runs
    assert call["argv"][1:] == ["-m", "imds_agent.redirect.iptworker", "ipv6", "apply"]
    assert json.loads(call["input"]) == WANTED["ipv6"]


def test_a_worker_error_becomes_a_redirect_error_with_a_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    answer_with(monkeypatch, json.dumps({"ok": False, "error": "IPTCError: Permission denied (you must be root)"}))
    with pytest.raises(RedirectError, match=r"iptables ipv4 state: .*Permission denied.*\(needs CAP_NET_ADMIN"):
        iptables._worker("ipv4", "state")


def test_a_worker_without_an_answer_is_a_redirect_error(monkeypatch: pytest.MonkeyPatch) -> None:
    for stdout in ("", "Segmentation fault\n"):
        answer_with(monkeypatch, stdout)
        with pytest.raises(RedirectError, match="the worker gave no answer"):
            iptables._worker("ipv4", "state")


# --- what the worker reads from python-iptables ---------------------------------------------------------------------


class Named:
    def __init__(self, name: str, params: Optional[dict[str, list[str]]] = None):
        self.name = name
        self.params = params or {}

    def get_all_parameters(self) -> dict[str, list[str]]:
        return self.params


class FakeRule:
    def __init__(self, target: str, dst: str = "0.0.0.0/0.0.0.0", matches: tuple[Named, ...] = (), to: str = ""):
        self.target = Named(target, {"to-destination": [to]} if to else {})
        self.dst = dst
        self.protocol = "tcp"
        self.matches = list(matches)

    def get_counters(self) -> tuple[int, int]:
        return 3, 180


class FakeChain:
    def __init__(self, name: str, rules: list[FakeRule]):
        self.name = name
        self.rules = rules


class FakeTable:
    def __init__(self, *chains: FakeChain):
        self.chains = list(chains)


def our_rule() -> FakeRule:
    matches = (
        Named("tcp", {"dport": ["80"]}),
        Named("owner", {"uid-owner": ["!", "990"]}),
        Named("comment", {"comment": ["imds_agent"]}),
    )
    return FakeRule("DNAT", "169.254.169.254/255.255.255.255", matches, to="127.0.0.1:8775")


def test_state_reads_our_chain_and_the_jumps_from_output(monkeypatch: pytest.MonkeyPatch) -> None:
    table = FakeTable(
        FakeChain("OUTPUT", [FakeRule(IPTABLES_CHAIN), FakeRule("DOCKER")]), FakeChain(IPTABLES_CHAIN, [our_rule()])
    )
    monkeypatch.setattr(iptworker, "_nat", lambda family: table)
    state = iptworker.state("ipv4")
    assert (state["chain"], state["jumps"], state["jump_first"]) == (True, 1, True)
    assert differences("ipv4", state, WANTED["ipv4"]) == []  # what the worker reads compares equal to the spec
    assert (state["rules"][0]["packets"], state["rules"][0]["bytes"]) == (3, 180)


def test_state_sees_a_jump_that_another_rule_precedes(monkeypatch: pytest.MonkeyPatch) -> None:
    table = FakeTable(FakeChain("OUTPUT", [FakeRule("DOCKER"), FakeRule(IPTABLES_CHAIN), FakeRule(IPTABLES_CHAIN)]))
    monkeypatch.setattr(iptworker, "_nat", lambda family: table)
    state = iptworker.state("ipv4")
    assert (state["chain"], state["jumps"], state["jump_first"], state["rules"]) == (False, 2, False, [])


def test_a_netmask_is_read_as_a_prefix_length() -> None:
    assert iptworker._prefix("169.254.169.254/255.255.255.255") == "169.254.169.254/32"
    assert iptworker._prefix("10.0.0.0/255.0.0.0") == "10.0.0.0/8"
    assert iptworker._prefix("fd00:ec2::254/128") == "fd00:ec2::254/128"


def test_worker_failures_are_answers_not_crashes(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def broken(family: str) -> dict[str, Any]:
        raise OSError("libxtables not found")

    monkeypatch.setattr(iptworker, "state", broken)
    assert iptworker.main(["ipv4", "state"]) == 0
    assert json.loads(capsys.readouterr().out) == {"ok": False, "error": "OSError: libxtables not found"}
    assert iptworker.main(["ipv5", "state"]) == 2
    assert json.loads(capsys.readouterr().out)["ok"] is False
