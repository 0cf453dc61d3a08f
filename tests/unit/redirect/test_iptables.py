"""The iptables backend without a kernel: how the state a worker reads back is compared with the spec, and how
worker answers become the backend protocol. The workers (python-iptables in a process of their own) are replaced
by canned answers; what iptworker reads from python-iptables objects is checked with fakes of those objects."""

from __future__ import annotations

import io
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


def wanted_rules(family: str, table: str) -> list[dict[str, Any]]:
    return next(part["rules"] for part in WANTED[family]["tables"] if part["table"] == table)


def found_table(
    family: str = "ipv4",
    table: str = "nat",
    chain: bool = True,
    jumps: int = 1,
    first: bool = True,
    change: Optional[dict[str, str]] = None,
) -> dict[str, Any]:
    """What a worker's ``state`` reports for one table of a family: our rules (with counters) unless told so."""
    rules = [dict(r, **(change or {}), packets=3, bytes=180) for r in wanted_rules(family, table)]
    return {"chain": chain, "jumps": jumps, "jump_first": first, "rules": rules if chain else []}


NOTHING = {"chain": False, "jumps": 0, "jump_first": False, "rules": []}


def found(
    family: str = "ipv4",
    chain: bool = True,
    jumps: int = 1,
    first: bool = True,
    change: Optional[dict[str, str]] = None,
    guard: Optional[dict[str, Any]] = None,
) -> dict[str, Any]:
    """Per table: the nat part as told, the filter part (the guard) intact unless ``guard`` says otherwise."""
    nat = found_table(family, "nat", chain, jumps, first, change)
    return {"nat": nat, "filter": guard if guard is not None else found_table(family, "filter")}


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


def test_a_missing_guard_is_reported() -> None:
    assert differences("ipv6", found("ipv6", guard=NOTHING), WANTED["ipv6"]) == [
        "ipv6 filter chain IMDS_AGENT is missing",
        "ipv6 filter jump from OUTPUT is missing",
    ]
    no_jump = found_table("ipv4", "filter", jumps=0)
    assert differences("ipv4", found(guard=no_jump), WANTED["ipv4"]) == ["ipv4 filter jump from OUTPUT is missing"]
    not_first = found_table("ipv4", "filter", first=False)
    assert differences("ipv4", found(guard=not_first), WANTED["ipv4"]) == [
        "ipv4 filter jump is not the first rule in OUTPUT"
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


@pytest.mark.parametrize(
    "change",
    [{"uid_owner": "!0"}, {"target": "DROP"}, {"reject_with": "icmp-port-unreachable"}, {"socket_exists": None}],
    ids=["uid", "drop", "icmp", "socketless"],
)
def test_a_changed_guard_rule_is_reported_with_what_is_wanted(change: dict[str, Any]) -> None:
    guard = found_table("ipv4", "filter", change=change)
    assert differences("ipv4", found(guard=guard), WANTED["ipv4"]) == [
        "ipv4 filter rules differ: has 1, wants '-A IMDS_AGENT -d 169.254.169.254/32 -p tcp -m tcp --dport 80 "
        "-m owner --socket-exists ! --uid-owner 990 -m comment --comment imds_agent -j REJECT --reject-with tcp-reset'"
    ]


def test_an_empty_or_doubled_chain_is_reported() -> None:
    nat = found_table()
    empty = dict(nat, rules=[])
    doubled = dict(nat, rules=nat["rules"] * 2)
    for state, count in ((empty, 0), (doubled, 2)):
        (detail,) = differences("ipv4", dict(found(), nat=state), WANTED["ipv4"])
        assert detail.startswith(f"ipv4 rules differ: has {count}, wants '-A IMDS_AGENT ")


def test_rules_of_a_family_that_is_not_wanted_are_reported() -> None:
    assert differences("ipv6", found("ipv6"), None) == ["ipv6 rules are installed but not wanted"]
    assert differences("ipv6", found("ipv6", chain=False, jumps=1, guard=NOTHING), None) == [
        "ipv6 rules are installed but not wanted"
    ]
    assert differences("ipv6", found("ipv6", chain=False, jumps=0), None) == [
        "ipv6 rules are installed but not wanted"
    ]  # the guard alone
    assert differences("ipv6", {"nat": NOTHING, "filter": NOTHING}, None) == []


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


def state(tables: dict[str, Any]) -> dict[str, Any]:
    """A worker's ``state`` answer."""
    return {"tables": tables}


def test_check_of_matching_families_is_present_with_counters(workers: Workers) -> None:
    workers.answers = {("ipv4", "state"): state(found()), ("ipv6", "state"): state(found("ipv6"))}
    result = IptablesBackend().check(SPEC)
    assert (result.state, result.details, result.owned) == (State.PRESENT, (), False)
    assert [(r.family, r.packets, r.bytes) for r in result.rules] == [("ipv4", 3, 180)] * 2 + [("ipv6", 3, 180)] * 2
    assert [r.text.split(" -A ")[0] for r in result.rules] == ["-t nat", "-t filter"] * 2
    assert result.rules[2].text == "-t nat " + iptrules.render(wanted_rules("ipv6", "nat")[0])
    assert result.rules[3].text.endswith("-j REJECT --reject-with tcp-reset")


def test_check_with_nothing_installed_is_absent(workers: Workers) -> None:
    nothing = state({"nat": NOTHING, "filter": NOTHING})
    workers.answers = {("ipv4", "state"): nothing, ("ipv6", "state"): nothing}
    result = IptablesBackend().check(SPEC)
    assert (result.state, result.details) == (State.ABSENT, ("chain IMDS_AGENT is missing",))


def test_check_with_one_family_missing_is_partial(workers: Workers) -> None:
    nothing = state({"nat": NOTHING, "filter": NOTHING})
    workers.answers = {("ipv4", "state"): state(found()), ("ipv6", "state"): nothing}
    result = IptablesBackend().check(SPEC)
    assert result.state == State.PARTIAL
    assert result.details == (
        "ipv6 chain IMDS_AGENT is missing",
        "ipv6 jump from OUTPUT is missing",
        "ipv6 filter chain IMDS_AGENT is missing",
        "ipv6 filter jump from OUTPUT is missing",
    )


def test_check_with_the_filter_part_missing_is_partial(workers: Workers) -> None:
    """The redirect alone (rules of an older agent, or an administrator's flush of filter) is repaired."""
    workers.answers = {
        ("ipv4", "state"): state(found(guard=NOTHING)),
        ("ipv6", "state"): state(found("ipv6", guard=found_table("ipv6", "filter", chain=False))),
    }
    result = IptablesBackend().check(SPEC)
    assert result.state == State.PARTIAL
    assert result.details == (
        "ipv4 filter chain IMDS_AGENT is missing",
        "ipv4 filter jump from OUTPUT is missing",
        "ipv6 filter chain IMDS_AGENT is missing",
    )


def test_check_without_a_spec_only_reports_what_is_installed(workers: Workers) -> None:
    workers.answers = {
        ("ipv4", "state"): state(found(jumps=3)),
        ("ipv6", "state"): state({"nat": NOTHING, "filter": NOTHING}),
    }
    result = IptablesBackend().check(None)
    assert (result.state, result.details, len(result.rules)) == (State.PRESENT, (), 2)


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
    runs = answer_with(monkeypatch, 'libxtables noise\n{"ok": true, "applied": 2}\n')
    assert iptables._worker("ipv6", "apply", WANTED["ipv6"]) == {"ok": True, "applied": 2}
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
        self.in_interface: Optional[str] = None
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


def our_guard() -> FakeRule:
    matches = (
        Named("tcp", {"dport": ["80"]}),
        Named("owner", {"socket-exists": [], "uid-owner": ["!", "990"]}),  # as iptc reads `--socket-exists ! ...`
        Named("comment", {"comment": ["imds_agent"]}),
    )
    rule = FakeRule("REJECT", "169.254.169.254/255.255.255.255", matches)
    rule.target.params = {"reject-with": ["tcp-reset"]}
    return rule


def worker_tables(monkeypatch: pytest.MonkeyPatch, tables: dict[str, FakeTable], registered: bool = True) -> None:
    monkeypatch.setattr(iptworker, "_table", lambda family, name: tables[name])
    monkeypatch.setattr(iptworker, "_registered", lambda family, name: registered)


def test_state_reads_our_chains_and_the_jumps_from_output_in_both_tables(monkeypatch: pytest.MonkeyPatch) -> None:
    nat = FakeTable(
        FakeChain("OUTPUT", [FakeRule(IPTABLES_CHAIN), FakeRule("DOCKER")]), FakeChain(IPTABLES_CHAIN, [our_rule()])
    )
    guard = FakeTable(FakeChain("OUTPUT", [FakeRule(IPTABLES_CHAIN)]), FakeChain(IPTABLES_CHAIN, [our_guard()]))
    worker_tables(monkeypatch, {"nat": nat, "filter": guard})
    state = iptworker.state("ipv4")["tables"]
    assert [(t["chain"], t["jumps"], t["jump_first"]) for t in state.values()] == [(True, 1, True)] * 2
    assert differences("ipv4", state, WANTED["ipv4"]) == []  # what the worker reads compares equal to the spec
    assert (state["nat"]["rules"][0]["packets"], state["filter"]["rules"][0]["bytes"]) == (3, 180)
    assert state["filter"]["rules"][0]["socket_exists"] is True and "to" not in state["filter"]["rules"][0]


def test_state_sees_a_jump_that_another_rule_precedes(monkeypatch: pytest.MonkeyPatch) -> None:
    table = FakeTable(FakeChain("OUTPUT", [FakeRule("DOCKER"), FakeRule(IPTABLES_CHAIN), FakeRule(IPTABLES_CHAIN)]))
    worker_tables(monkeypatch, {"nat": table, "filter": FakeTable(FakeChain("OUTPUT", []))})
    state = iptworker.state("ipv4")["tables"]["nat"]
    assert (state["chain"], state["jumps"], state["jump_first"], state["rules"]) == (False, 2, False, [])


def test_state_does_not_load_a_table_the_kernel_has_not_registered(monkeypatch: pytest.MonkeyPatch) -> None:
    worker_tables(monkeypatch, {}, registered=False)  # any load would fail: no tables given
    state = iptworker.state("ipv6")["tables"]
    assert state == {"nat": NOTHING, "filter": NOTHING}


# --- what the worker does to python-iptables ------------------------------------------------------------------------


class IPTCError(Exception):
    pass


class XTablesError(Exception):
    pass


class Param:
    """A match or target: records what is set on it."""

    def __init__(self, name: str):
        self.name = name
        self.set: dict[str, Any] = {}

    def __setattr__(self, key: str, value: Any) -> None:
        if key in ("name", "set"):
            object.__setattr__(self, key, value)
        else:
            self.set[key] = value


class Kernel:
    """Stands in for python-iptables: tables by name (absent ones fail to load), extensions that exist, commits."""

    def __init__(self, tables: tuple[str, ...] = ("nat", "filter"), targets: tuple[str, ...] = ("DNAT", "REJECT")):
        self.targets = targets
        self.chains: dict[str, dict[str, list[Any]]] = {t: {"OUTPUT": []} for t in tables}
        self.commits: list[str] = []
        self.IPTCError, self.XTablesError = IPTCError, XTablesError
        kernel = self

        class Rule:
            def __init__(self) -> None:
                self.matches: list[Param] = []
                self.target = Param("")

            def create_match(self, name: str) -> Param:
                self.matches.append(Param(name))
                return self.matches[-1]

            def create_target(self, name: str) -> Param:
                if name not in kernel.targets and name != IPTABLES_CHAIN:
                    raise XTablesError(f"can't find target {name}")
                self.target = Param(name)
                return self.target

        class Chain:
            def __init__(self, table: str, name: str):
                self.table, self.name = table, name

            @property
            def rules(self) -> list[Any]:
                return list(kernel.chains[self.table][self.name])

            def flush(self) -> None:
                kernel.chains[self.table][self.name] = []

            def append_rule(self, rule: Any) -> None:
                kernel.chains[self.table][self.name].append(rule)

            def insert_rule(self, rule: Any) -> None:
                kernel.chains[self.table][self.name].insert(0, rule)

            def delete_rule(self, rule: Any) -> None:
                kernel.chains[self.table][self.name].remove(rule)

            def delete(self) -> None:
                del kernel.chains[self.table][self.name]

        class Table:
            NAT, FILTER = "nat", "filter"

            def __init__(self, name: str):
                self.name = name
                self.autocommit = True

            def refresh(self) -> None:
                if self.name not in kernel.chains:
                    raise IPTCError(f"can't initialize ip6tables table `{self.name}': Table does not exist")

            @property
            def chains(self) -> list[Any]:
                return [Chain(self.name, c) for c in kernel.chains[self.name]]

            def create_chain(self, name: str) -> Any:
                kernel.chains[self.name][name] = []
                return Chain(self.name, name)

            def commit(self) -> None:
                kernel.commits.append(self.name)

        self.Table, self.Rule = Table, Rule

    def ours(self, table: str) -> list[str]:
        """Our chain's targets and the OUTPUT jumps, per table."""
        chain = self.chains[table]
        return [r.target.name for r in chain.get(IPTABLES_CHAIN, [])] + [
            "jump" for r in chain["OUTPUT"] if r.target.name == IPTABLES_CHAIN
        ]


def on(monkeypatch: pytest.MonkeyPatch, kernel: Kernel, registered: tuple[str, ...] = ("nat", "filter")) -> Kernel:
    monkeypatch.setattr(iptworker, "_tables", lambda family: (kernel, kernel.Table, kernel.Rule))
    monkeypatch.setattr(iptworker, "_registered", lambda family, name: name in registered)
    return kernel


def test_apply_commits_the_redirect_then_the_guard_and_remove_takes_both_guard_first(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    kernel = on(monkeypatch, Kernel())
    assert iptworker.apply("ipv6", WANTED["ipv6"]) == {"applied": 2}
    assert kernel.commits == ["nat", "filter"]
    assert (kernel.ours("nat"), kernel.ours("filter")) == (["DNAT", "jump"], ["REJECT", "jump"])
    guard = kernel.chains["filter"][IPTABLES_CHAIN][0]
    owner = next(m for m in guard.matches if m.name == "owner")
    assert owner.set == {"socket_exists": "", "uid_owner": "!990"} and guard.target.set == {"reject_with": "tcp-reset"}
    kernel.commits.clear()
    assert iptworker.remove("ipv6") == {"removed": True}
    assert kernel.commits == ["filter", "nat"]
    assert kernel.chains == {"nat": {"OUTPUT": []}, "filter": {"OUTPUT": []}}
    assert iptworker.remove("ipv6") == {"removed": False}


def test_remove_skips_a_table_the_kernel_never_registered(monkeypatch: pytest.MonkeyPatch) -> None:
    kernel = on(monkeypatch, Kernel(tables=("nat",)), registered=("nat",))
    assert iptworker.remove("ipv6") == {"removed": False}
    assert kernel.commits == []  # nothing of ours was there: nothing to commit, and filter is never loaded


def answer(capsys: pytest.CaptureFixture[str], argv: list[str]) -> dict[str, Any]:
    assert iptworker.main(argv) == 0
    result: dict[str, Any] = json.loads(capsys.readouterr().out)
    return result


def test_a_missing_ip6tables_filter_table_is_named_and_changes_nothing(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    kernel = on(monkeypatch, Kernel(tables=("nat",)))
    monkeypatch.setattr("sys.stdin", io.StringIO(json.dumps(WANTED["ipv6"])))
    got = answer(capsys, ["ipv6", "apply"])
    assert got["ok"] is False and got["error"].startswith(
        "Unavailable: ip6tables filter table is unavailable (kernel needs CONFIG_IP6_NF_FILTER): can't initialize"
    )
    assert kernel.commits == [] and kernel.chains["nat"] == {"OUTPUT": []}  # the redirect was not half applied
    assert answer(capsys, ["ipv6", "probe"])["error"].startswith("Unavailable: ip6tables filter table is unavailable")


def test_a_missing_reject_target_is_named_and_changes_nothing(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    kernel = on(monkeypatch, Kernel(targets=("DNAT",)))
    monkeypatch.setattr("sys.stdin", io.StringIO(json.dumps(WANTED["ipv4"])))
    got = answer(capsys, ["ipv4", "apply"])
    assert got["ok"] is False
    assert got["error"] == (
        "Unavailable: iptables REJECT target is unavailable (userspace lib*t_REJECT.so, kernel "
        "CONFIG_IP_NF_TARGET_REJECT): can't find target REJECT"
    )
    assert kernel.commits == []
    assert "REJECT target is unavailable" in answer(capsys, ["ipv4", "probe"])["error"]


def test_a_kernel_refusing_the_guard_at_commit_names_the_reject_target(monkeypatch: pytest.MonkeyPatch) -> None:
    kernel = on(monkeypatch, Kernel())

    def refuse(self: Any) -> None:
        if self.name == "filter":
            raise IPTCError("No chain/target/match by that name")
        kernel.commits.append(self.name)

    monkeypatch.setattr(kernel.Table, "commit", refuse)
    with pytest.raises(iptworker.Unavailable, match=r"ip6tables filter table refused our chain \(the guard's REJECT "
                       r"target needs CONFIG_IP6_NF_TARGET_REJECT\): No chain"):  # fmt: skip
        iptworker.apply("ipv6", WANTED["ipv6"])


def test_the_backend_passes_the_worker_s_naming_on(workers: Workers) -> None:
    error = (
        "iptables ipv6 apply: Unavailable: ip6tables filter table is unavailable (kernel needs CONFIG_IP6_NF_FILTER)"
    )
    workers.answers = {("ipv6", "apply"): RedirectError(error)}
    with pytest.raises(RedirectError, match=r"ip6tables filter table is unavailable \(kernel needs CONFIG_IP6"):
        IptablesBackend().apply(SPEC)


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


CONTAINER_SPEC = RedirectSpec(exempt_uid=990, listen_port=968, container_ifaces=("docker*",), container_port=969)


def container_state(spec: RedirectSpec, family: str = "ipv4") -> dict[str, Any]:
    parts = iptrules.build_rules(spec)[family].get("containers", [])
    return {p["chain"]: {"chain": True, "jumps": 1, "jump_first": True, "rules": p["rules"]} for p in parts}


def test_container_chains_as_wanted_have_no_differences() -> None:
    wanted = iptrules.build_rules(CONTAINER_SPEC)["ipv4"]
    assert IptablesBackend._container_differences("ipv4", container_state(CONTAINER_SPEC), wanted) == []


def test_a_missing_container_jump_and_unwanted_container_chains_are_named() -> None:
    wanted = iptrules.build_rules(CONTAINER_SPEC)["ipv4"]
    found = container_state(CONTAINER_SPEC)
    found["IMDS_AGENT_IN"] = dict(found["IMDS_AGENT_IN"], jumps=0)
    assert IptablesBackend._container_differences("ipv4", found, wanted) == ["ipv4 nat jump from PREROUTING is missing"]
    plain = iptrules.build_rules(RedirectSpec(exempt_uid=990, listen_port=968))["ipv4"]
    assert IptablesBackend._container_differences("ipv4", container_state(CONTAINER_SPEC), plain) == [
        "ipv4 container chains are installed but not wanted"
    ]
