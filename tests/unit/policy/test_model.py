"""Rules and policies as data: what a rule matches and grants, and what a policy refuses to be."""

from __future__ import annotations

import dataclasses

import pytest

from imds_agent.identity.caller import Caller
from imds_agent.policy.model import Policy, Rule
from imds_agent.policy.paths import normalize

CURL = Caller(True, 10, "/usr/bin/curl", 1000, "app", ("curl", "-s", "--prod"))


def test_a_rule_matches_on_every_key_it_sets() -> None:
    assert Rule("r", ("/usr/bin/*",)).matches_caller(CURL)
    assert not Rule("r", ("/usr/bin/*",), uids=(0,)).matches_caller(CURL)
    assert not Rule("r", ("/usr/bin/curl",), users=("root",)).matches_caller(CURL)
    assert Rule("r", ("/usr/bin/curl",), cmdline="*--prod*").matches_caller(CURL)
    assert not Rule("r", ("/usr/bin/curl",), sha256=("ab" * 32,)).matches_caller(CURL, exe_sha256="cd" * 32)
    assert not Rule("r", ("/usr/bin/curl",)).matches_caller(Caller.unknown("gone"))


def test_a_file_that_is_not_the_hosts_matches_only_container_rules() -> None:
    impostor = dataclasses.replace(CURL, exe_verified=False)
    assert not Rule("r", ("/usr/bin/curl",)).matches_caller(impostor)
    assert Rule("r", ("/usr/bin/curl",), in_containers=True).matches_caller(impostor)


def test_a_wildcard_never_grants_a_sensitive_class() -> None:
    creds = normalize("/latest/meta-data/iam/security-credentials/role")
    assert not Rule("r", ("/x",), paths=("**",)).grants(creds)
    assert Rule("r", ("/x",), sensitive=("credentials",)).grants(creds)
    assert Rule("r", ("/x",), paths=("meta-data/placement/**",)).grants(normalize("/latest/meta-data/placement/region"))


def test_bad_values_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown sensitive class"):
        Rule("r", ("/x",), sensitive=("passwords",))
    with pytest.raises(ValueError, match="default must be one of"):
        Policy(default="allow-some")
    assert Policy((Rule("r", ("/x",), sha256=("ab" * 32,)),)).needs_hash and not Policy().needs_hash


def test_a_rule_that_refuses_preloaded_callers_does_not_match_them() -> None:
    preloaded = dataclasses.replace(CURL, preload=("LD_PRELOAD",))
    assert Rule("r", ("/usr/bin/curl",)).matches_caller(preloaded)  # recorded, not refused, unless the rule says
    assert not Rule("r", ("/usr/bin/curl",), refuse_preload=True).matches_caller(preloaded)
    assert Rule("r", ("/usr/bin/curl",), refuse_preload=True).matches_caller(CURL)


def test_a_refusal_says_which_patterns_were_tried_and_a_class_no_pattern_can_reach_is_found() -> None:
    creds = normalize("/latest/meta-data/iam/security-credentials/role")
    one_segment = Rule("r", ("/x",), paths=("*",), sensitive=("credentials",))
    assert not one_segment.grants(creds)
    reason = one_segment.refusal(creds)
    assert "none of the rule's paths ('*') matches meta-data/iam/security-credentials/role" in reason
    assert "'*' matches within one segment" in reason
    assert "does not name the credentials class" in Rule("r", ("/x",)).refusal(creds)
    assert one_segment.unreachable_classes() == ("credentials",)
    assert Rule("r", ("/x",), sensitive=("credentials",)).unreachable_classes() == ()
    narrow = Rule("r", ("/x",), paths=("meta-data/iam/security-credentials/*",), sensitive=("credentials",))
    assert narrow.unreachable_classes() == () and narrow.grants(creds)
