"""The tests mirror the package: every module under agent/imds_agent has tests/unit/<same path>/test_<module>.py, or
is listed here with where it is tested instead and why; every unit test file belongs to a module (or is listed)."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "agent" / "imds_agent"
UNIT = ROOT / "tests" / "unit"

# Modules whose tests need real sockets, processes or the kernel, so they live outside tests/unit.
TESTED_ELSEWHERE = {
    "daemon.py": "assembles real listeners, threads and files: tests/integration/test_daemon.py",
    "introspect.py": "views of a running Agent: tests/integration/test_daemon.py",
    "proxy/server.py": "accept loop and workers on real sockets: tests/integration/test_server.py",
    "imds/upstream.py": "the HTTP pool against a real server: tests/integration/test_upstream_headers.py",
    "redirect/iptworker.py": "runs as its own process against libiptc: tests/privileged/test_iptables.py",
    "redirect/base.py": "types and the Backend protocol only; every backend's tests use them",
    "imds/protocol.py": "names of the protocol only; test_token.py and test_handler.py use them",
    "sandbox/agentproc.py": "the test bed itself: tests/privileged/test_sandbox.py and test_demo.py",
    "sandbox/control.py": "the test bed itself: tests/integration/test_emulator.py",
    "sandbox/demo.py": "the demo, run whole: tests/privileged/test_demo.py",
    "sandbox/emulator.py": "the metadata service double: tests/integration/test_emulator.py",
    "sandbox/metadata.py": "the double's data: tests/integration/test_emulator.py",
    "sandbox/netns.py": "network namespaces: tests/privileged/test_sandbox.py",
    "sandbox/tap.py": "packet capture in a namespace: tests/privileged/test_sandbox.py",
}
# Unit test files that test something other than one module, and what.
EXTRA_TESTS = {
    "audit/test_records.py": "the audit line format of audit/log.py (test_log.py stubs the format out)",
    "policy/test_paths_properties.py": "property tests of policy/paths.py (hypothesis)",
    "policy/test_shipped_rules.py": "the drop-ins shipped in rules/ load and decide as documented",
    "test_ssm_documents.py": "the SSM documents in packaging/ssm",
    "test_distributor.py": "the SSM Distributor builder in packaging/distributor (not part of the package)",
}


def modules() -> set[str]:
    return {str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py") if p.name != "__init__.py"}


def mirror(module: str) -> str:
    path = Path(module)
    return str(path.parent / f"test_{path.name}") if str(path.parent) != "." else f"test_{path.name}"


def test_every_module_has_its_mirror_test_or_a_stated_reason() -> None:
    unit = {str(p.relative_to(UNIT)) for p in UNIT.rglob("test_*.py")}
    missing = sorted(m for m in modules() if m not in TESTED_ELSEWHERE and mirror(m) not in unit)
    assert missing == [], f"modules without tests/unit/<path>/test_<module>.py: {missing}"


def test_every_unit_test_file_mirrors_a_module() -> None:
    expected = {mirror(m) for m in modules()}
    stray = sorted(
        str(p.relative_to(UNIT))
        for p in UNIT.rglob("test_*.py")
        if str(p.relative_to(UNIT)) not in expected and str(p.relative_to(UNIT)) not in EXTRA_TESTS
    )
    assert stray == [], f"unit test files that mirror no module: {stray}"


def test_the_exemptions_name_real_files() -> None:
    assert set(TESTED_ELSEWHERE) <= modules()
    assert all((UNIT / name).exists() for name in EXTRA_TESTS)
    for module in TESTED_ELSEWHERE:
        assert not (UNIT / mirror(module)).exists(), f"{module} has a unit test now: drop its exemption"
