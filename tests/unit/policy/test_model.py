"""Rules and policies as data: what a rule matches and grants, and what a policy refuses to be."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from imds_agent.identity.caller import Caller, ContainerInfo
from imds_agent.policy.model import ANY_EXE, Policy, Rule, WorkloadPattern, image_glob, value_glob
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


WEB = ContainerInfo(
    "ab" * 32,
    "docker",
    "web-1",
    "registry.example.com/billing/web:1.4",
    (("team", "billing"), ("tier", "")),
    pod_namespace="payments",
    pod_name="exporter-7d9f8b6c5-x2x7q",
)
IN_WEB = Caller(True, 20, "/app/web", 1000, None, exe_verified=False, workload=WEB)


def rule_for(**fields: Any) -> Rule:
    return Rule("c", ANY_EXE, workload=WorkloadPattern(**fields))


def test_a_container_rule_matches_every_field_it_gives_and_nothing_on_the_host() -> None:
    assert rule_for(image="registry.example.com/billing/*:*").matches_caller(IN_WEB)
    assert rule_for(image="registry.example.com/**").matches_caller(IN_WEB)
    assert rule_for(name="web-*", runtime="docker", labels=(("team", "bill*"),)).matches_caller(IN_WEB)
    assert rule_for(pod_namespace="payments", pod_name="exporter-*").matches_caller(IN_WEB)
    assert not rule_for(image="registry.example.com/billing/*:*", name="api-*").matches_caller(IN_WEB)
    assert not rule_for(runtime="containerd").matches_caller(IN_WEB)
    # The same executable on the host, verified or not, is no container's.
    host = dataclasses.replace(IN_WEB, workload=None, exe_verified=True)
    assert not rule_for(image="**").matches_caller(host)
    assert not rule_for(image="**").matches_caller(Caller.unknown("gone"))


def test_a_container_rules_exe_is_the_path_inside_and_the_host_file_check_does_not_apply() -> None:
    rule = Rule("c", ("/app/*",), workload=WorkloadPattern(image="registry.example.com/**"))
    assert rule.matches_caller(IN_WEB)  # exe_verified is False: the image's own file
    assert not rule.matches_caller(dataclasses.replace(IN_WEB, exe="/bin/sh"))
    assert not Rule("c", ("/app/*",), workload=WorkloadPattern(image="registry.example.com/**"),
                    uids=(0,)).matches_caller(IN_WEB)  # fmt: skip


def test_a_rule_without_container_keys_keeps_its_meaning_for_container_callers() -> None:
    assert not Rule("host", ("/app/web",)).matches_caller(IN_WEB)  # not the host's file
    assert Rule("ecs", ("/app/web",), in_containers=True).matches_caller(IN_WEB)


def test_a_missing_label_or_field_never_satisfies_a_pattern_even_a_star() -> None:
    assert not rule_for(labels=(("owner", "*"),)).matches_caller(IN_WEB)
    assert rule_for(labels=(("tier", "*"),)).matches_caller(IN_WEB)  # present, empty
    bare = dataclasses.replace(IN_WEB, workload=ContainerInfo("cd" * 32, "unknown"))
    for fields in ({"image": "**"}, {"name": "*"}, {"runtime": "*"}, {"pod_namespace": "*"}, {"pod_name": "*"},
                   {"service_account": "*"}):  # fmt: skip
        assert not rule_for(**fields).matches_caller(bare), fields
    pattern = WorkloadPattern(image="**", name="web-*", labels=(("team", "billing"),))
    assert pattern.mismatch(WEB) is None and pattern.mismatch(bare.workload) == "image"  # type: ignore[arg-type]
    assert WorkloadPattern(labels=(("owner", "x"),)).mismatch(WEB) == "label owner"


@pytest.mark.parametrize(
    "image",
    [
        "registry.example.com/billing/web@sha256:" + "ab" * 32,  # a digest is not a tag
        "evil.example.net/registry.example.com/billing/web:1.4",  # another registry, the name as a path
        "registry.example.com.evil.net/billing/web:1.4",
        "registry.example.com/billing/web/extra:1.4",  # '*' stays within one segment
        "registry.example.com/billing/web:1.4\nregistry.example.com/billing/web:1.4",
    ],
)
def test_an_image_from_elsewhere_does_not_match_a_pattern_for_one_registry(image: str) -> None:
    caller = dataclasses.replace(IN_WEB, workload=dataclasses.replace(WEB, image=image))
    assert not rule_for(image="registry.example.com/billing/*:*").matches_caller(caller)


def test_label_and_name_globs_are_plain_globs_over_the_whole_value() -> None:
    assert value_glob("b[ai]lling").fullmatch("b[ai]lling") and not value_glob("b[ai]lling").fullmatch("billing")
    assert value_glob("web-?").fullmatch("web-1") and not value_glob("web-?").fullmatch("web-12")
    forged = dataclasses.replace(IN_WEB, workload=dataclasses.replace(WEB, labels=(("team", "billing\nteam: ops"),)))
    assert not rule_for(labels=(("team", "billing*"),)).matches_caller(forged)  # '*' never spans a newline
    assert not rule_for(labels=(("team", "billing"),)).matches_caller(forged)


def test_an_image_star_stays_within_one_component_and_two_stars_span_them() -> None:
    assert image_glob("registry.example.com/billing/*:*").fullmatch("registry.example.com/billing/web:1.4")
    assert image_glob("localhost:*/app:*").fullmatch("localhost:5000/app:1")
    assert image_glob("registry.example.com/web@sha256:*").fullmatch("registry.example.com/web@sha256:" + "ab" * 32)
    assert image_glob("registry.example.com/**").fullmatch("registry.example.com/web:1@sha256:" + "ab" * 32)
    assert not image_glob("registry.example.com/web:*").fullmatch("registry.example.com/web:1@sha256:" + "ab" * 32)


def test_an_exe_followed_by_a_newline_is_not_the_exe() -> None:
    assert not Rule("r", ("/usr/bin/curl",)).matches_caller(dataclasses.replace(CURL, exe="/usr/bin/curl\n"))
