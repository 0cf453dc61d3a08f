"""The Caller: an unidentified one is nobody in particular, and its description says why."""

from __future__ import annotations

from imds_agent.identity.caller import Caller


def test_an_unknown_caller_keeps_the_uid_and_the_reason_and_is_not_known() -> None:
    c = Caller.unknown("no readable process holds socket 42", uid=1000)
    assert (c.known, c.pid, c.exe, c.uid) == (False, None, None, 1000)
    assert c.describe() == "unknown caller (uid=1000: no readable process holds socket 42)"
    assert Caller.unknown("gone").describe() == "unknown caller (uid=?: gone)"


def test_a_known_caller_is_described_by_exe_pid_and_uid() -> None:
    assert Caller(True, 10, "/usr/bin/curl", 1000).describe() == "/usr/bin/curl (pid=10, uid=1000)"


def test_an_executable_path_cannot_forge_a_log_line() -> None:
    forged = Caller(True, 10, "/tmp/x\nWARNING imds_agent: allowed\u2028\x85", 1000)
    text = forged.describe()
    assert "\n" not in text and "\u2028" not in text and "\x85" not in text
    assert text.startswith("/tmp/x\\nWARNING imds_agent: allowed\\u2028\\x85 (pid=10")
