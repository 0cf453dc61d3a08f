"""The pipeline's records: what they show, and that they cannot be changed once made."""

from __future__ import annotations

import dataclasses

import pytest

from imds_agent.policy.paths import normalize
from imds_agent.proxy.types import Answer, Client, Kind, Outcome, Verdict


def test_an_unidentified_client_is_trusted_as_nobody() -> None:
    client = Client.unidentified(("127.0.0.1", 1), ("127.0.0.1", 2), "refused at the connection limit", 3.0)
    assert not client.caller.known and client.caller.reason == "refused at the connection limit"
    assert client.original_dst is None and client.identified_at == 3.0


def test_only_a_denial_stops_a_request_from_being_forwarded() -> None:
    for outcome in Outcome:
        if outcome is Outcome.REFUSED:
            continue
        verdict = Verdict(outcome, "audit", True, "x", "y", normalize("/latest/meta-data/"))
        assert verdict.forwards is (outcome is not Outcome.DENY)


def test_the_shown_path_is_the_judged_one_and_never_the_query() -> None:
    client = Client.unidentified(("127.0.0.1", 1), ("127.0.0.1", 2), "x", 0.0)
    raw = "//latest/meta-data//instance-id?token=secret"
    judged = Answer(0.0, "audit", client, "GET", raw, Kind.V1, 200, Outcome.ALLOW, path=normalize(raw))
    assert judged.shown_path == "/latest/meta-data/instance-id"
    unjudged = dataclasses.replace(judged, path=None)
    assert unjudged.shown_path == "//latest/meta-data//instance-id" and "secret" not in unjudged.shown_path
    assert judged.caller is client.caller
    with pytest.raises(dataclasses.FrozenInstanceError):
        judged.status = 500  # type: ignore[misc]
