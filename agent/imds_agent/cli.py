"""The imds-agent command line: argparse subcommands that call into the package; nothing else lives here."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import pwd
import sys
import time
from collections.abc import Sequence
from typing import Any, Optional

from . import __version__, privileges
from . import config as configmod
from .errors import EXIT_FAILURE, EXIT_OK, AgentError
from .identity.containers import RUNTIMES
from .policy.explain import label
from .redirect.base import Backend, RedirectSpec, State
from .redirect.lifecycle import remove_on_stop, spec_for
from .redirect.registry import BACKEND_NAMES, make_backend, select_backend

log = logging.getLogger("imds_agent")


def _load(args: argparse.Namespace) -> configmod.Config:
    return configmod.load(args.config, required=args.config != configmod.DEFAULT_PATH)


def cmd_run(args: argparse.Namespace) -> int:
    """run / audit / enforce: start the agent in the config's mode, or in the one named (overriding the file)."""
    from . import daemon

    config = _load(args)
    override = None if args.command == "run" else args.command
    return daemon.run(config, mode_override=override)


def cmd_check_config(args: argparse.Namespace) -> int:
    """Validate the configuration without side effects and print the effective settings."""
    config = _load(args)
    print(f"{config.source or 'built-in defaults'}: OK")
    print(f"mode: {config.mode}")
    print(f"user: {config.user}")
    print(f"listen: {', '.join(config.listen.addresses)} port {config.listen.port}")
    up = config.upstream
    print(f"upstream: {up.ipv4}:{up.port} (ipv6 {up.ipv6}), timeouts {up.connect_timeout}s/{up.read_timeout}s")
    print(f"token: ttl {config.token.ttl}s, refresh {config.token.refresh_margin}s before expiry")
    rd = config.redirect
    print(
        f"redirect: {'enabled' if rd.enabled else 'disabled'}, backend {rd.backend}, ipv6 {rd.ipv6}, "
        f"fail_mode {rd.fail_mode}, reconcile every {rd.reconcile_interval}s"
    )
    from .policy.loader import load_policy

    policy = load_policy(config.policy.dir, config.policy.default, config.policy.unknown)
    print(f"policy: {config.policy.dir}: {len(policy.files)} files, {len(policy.rules)} rules")
    print(f"  callers no rule matches: {policy.default}; unidentified callers: {policy.unknown}")
    for rule in policy.rules:
        who = ", ".join(rule.exe)
        if rule.uids:
            who += f" uid {','.join(map(str, rule.uids))}"
        if rule.users:
            who += f" user {','.join(rule.users)}"
        extra = f"; sensitive: {', '.join(rule.sensitive)}" if rule.sensitive else ""
        extra += "; no token injection" if not rule.inject_token else ""
        extra += "; also inside containers" if rule.in_containers else ""
        extra += "; not for callers started with LD_PRELOAD/LD_AUDIT" if rule.refuse_preload else ""
        extra += f"; only in containers with {rule.workload.describe()}" if rule.workload is not None else ""
        print(f"  - {rule.name} [{rule.source}]: {who} -> {', '.join(rule.paths)}{extra}")
    print(f"audit: {config.audit.log}, state {config.audit.state_dir}")
    from .redirect.coverage import coverage_lines

    for warning in trust_warnings(policy) + coverage_lines(config.containers):
        print(f"warning: {warning}")
    return EXIT_OK


def trust_warnings(policy: Any, ptrace_scope_path: str = "/proc/sys/kernel/yama/ptrace_scope") -> list[str]:
    """What weakens the trust a rule puts in a process of its uid running its file (README: trust boundary)."""
    out = []
    try:
        with open(ptrace_scope_path, encoding="ascii") as fh:
            scope = fh.read().strip()
        if scope == "0":
            out.append("kernel.yama.ptrace_scope is 0: any process can ptrace another of its uid and act as it; "
                       "set it to 1 or more")  # fmt: skip
    except OSError:
        out.append("Yama is not enabled: any process can ptrace another of its uid and act as it")
    for rule in policy.rules:
        for cls in rule.unreachable_classes():
            out.append(f"rule {rule.name} [{rule.source}] names the {cls} class but none of its paths can match it "
                       "('*' matches within one segment; use '**' or the class's own path)")  # fmt: skip
        if rule.cmdline is not None and not rule.uids and not rule.users:
            out.append(f"rule {rule.name} [{rule.source}] matches on cmdline without uid or user: any user can run "
                       "its executable with that command line")  # fmt: skip
        if rule.workload is not None and rule.workload.service_account is not None:
            out.append(f"rule {rule.name} [{rule.source}] names a service account, which no runtime's state "
                       "records (only the pod's token, a credential never read): it never matches")  # fmt: skip
    return out


def _backend_for(args: argparse.Namespace) -> tuple[configmod.Config, Backend]:
    config = _load(args)
    name = args.backend or config.redirect.backend
    return config, select_backend(name)


def _spec(config: configmod.Config) -> RedirectSpec:
    account = privileges.resolve_user(config.user, config.source)
    cc = config.containers
    return spec_for(config.redirect, config.upstream, account.uid, config.listen.port, cc.interfaces,
                    cc.port if cc.enabled else 0)  # fmt: skip


def _live(config: configmod.Config, command: str) -> Optional[Any]:
    """The running agent's answer over its control socket, or None (then the caller reads the saved state and
    says so on stderr)."""
    from .control import ask

    answer = ask(command, config.control_socket)
    if answer is None:
        print(f"imds-agent: no running agent answered at {config.control_socket}; showing the saved state",
              file=sys.stderr)  # fmt: skip
    return answer


def cmd_status(args: argparse.Namespace) -> int:
    """The running agent's mode, backend, rule state, token expiry, totals and uptime (exit 3 when not running)."""
    config = _load(args)
    answer = _live(config, "status")
    if answer is None:
        print(f"not running; configured mode {config.mode}, backend {config.redirect.backend}")
        return 3  # as `systemctl status` does for an inactive unit
    if args.json:
        print(json.dumps(answer, indent=2))
        return EXIT_OK
    print(answer.pop("status_line"))
    for key, value in answer.items():
        print(f"  {key}: {value}")
    return EXIT_OK


def cmd_rules_show(args: argparse.Namespace) -> int:
    """Print what redirect rules are installed, against what the configuration asks for."""
    config = _load(args)
    doc = _live(config, "rules") if not args.backend else None
    if doc is not None and args.json:
        print(json.dumps(doc, indent=2))
        return EXIT_OK
    config, backend = _backend_for(args)
    try:
        result = backend.check(_spec(config))
    finally:
        backend.close()
    if args.json:
        doc = dataclasses.asdict(result)
        doc["state"] = result.state.value
        print(json.dumps(doc, indent=2))
        return EXIT_OK
    owned = {None: "", True: ", owned by the running agent (removed when it exits)", False: ", persistent"}
    print(f"backend: {result.backend}")
    print(f"state: {result.state.value}{owned[result.owned] if result.state is not State.ABSENT else ''}")
    for detail in result.details:
        print(f"  ! {detail}")
    for rule in result.rules:
        counters = f"  [{rule.packets} packets, {rule.bytes} bytes]" if rule.packets is not None else ""
        print(f"  {rule.family}: {rule.text}{counters}")
    return EXIT_OK


def cmd_rules_apply(args: argparse.Namespace) -> int:
    """Install the redirect as the configuration describes it, persistent until `rules remove`."""
    config, backend = _backend_for(args)
    try:
        spec = _spec(config)
        backend.apply(spec, owned=False)
        state = backend.check(spec).state
    finally:
        backend.close()
    print(f"{backend.name}: redirect rules {state.value}")
    return EXIT_OK if state is State.PRESENT else EXIT_FAILURE


def cmd_rules_remove(args: argparse.Namespace) -> int:
    """Remove the agent's rules from every backend (crash recovery, uninstall); idempotent."""
    if args.if_fail_open:
        # The unit's ExecStopPost: only when the configuration says the service must fail open.
        remove, why = remove_on_stop(lambda: _load(args).redirect)
        print(why)
        if not remove:
            return EXIT_OK
    # No config needed: removal must work even when the configuration is broken or already gone.
    names = [args.backend] if args.backend else list(BACKEND_NAMES)
    for name in names:
        backend = make_backend(name)
        if not backend.is_supported():
            if args.backend:
                print(f"{name}: not supported here ({backend.unsupported_reason()})")
            continue
        try:
            removed = backend.remove()
        finally:
            backend.close()
        print(f"{name}: {'removed' if removed else 'nothing installed'}")
    return EXIT_OK


def _inventory(args: argparse.Namespace) -> Any:
    from .audit.inventory import Inventory

    config = _load(args)
    return Inventory(config.audit.state_dir).load()


def cmd_report(args: argparse.Namespace) -> int:
    """One row per caller from the persisted inventory."""
    from .audit import report
    from .audit.inventory import Entry

    since = time.time() - args.hours * 3600 if args.hours else None
    config = _load(args)
    live = _live(config, "report")
    inventory = None if live is not None else _inventory(args)
    entries = inventory.entries() if inventory is not None else [Entry(**e) for e in live or []]
    rows = report.report(entries, since)
    if args.json:
        print(json.dumps([r.as_dict() for r in rows], indent=2))
    else:
        print(report.render_table(rows))
        if inventory is not None and (inventory.evicted or inventory.overflowed):
            print(report.bound_note(inventory.evicted, inventory.overflowed))
        from .redirect.coverage import coverage_lines

        for line in coverage_lines(config.containers):
            print(line)
    return EXIT_OK


def cmd_suggest(args: argparse.Namespace) -> int:
    """Write a policy.d file allowing exactly what audit saw (to stdout, or a file that must not exist yet)."""
    from .audit import report

    text = report.suggest(_inventory(args).entries())
    if args.output in (None, "-"):
        print(text, end="")
        return EXIT_OK
    try:
        with open(args.output, "x", encoding="utf-8") as fh:
            fh.write(text)
    except FileExistsError:
        raise AgentError(f"{args.output} exists; choose another name or remove it first") from None
    except OSError as exc:
        raise AgentError(f"cannot write {args.output}: {exc.strerror}") from None
    print(f"wrote {args.output}; review it, then `imds-agent check-config` and reload")
    return EXIT_OK


def cmd_explain(args: argparse.Namespace) -> int:
    """What enforce mode would decide for an executable, uid and path (and container), and why."""
    from .identity.caller import Caller
    from .policy.explain import described_container, explain
    from .policy.loader import load_policy

    config = _load(args)
    policy = load_policy(config.policy.dir, config.policy.default, config.policy.unknown)
    user = args.user
    if user is None:
        try:
            user = pwd.getpwuid(args.uid).pw_name
        except KeyError:
            user = None
    workload = described_container(args.container_image, args.container_name, args.container_runtime, args.label,
                                   args.pod_namespace, args.pod_name, args.service_account)  # fmt: skip
    caller = Caller(True, None, args.exe, args.uid, user, tuple(args.cmdline or ()),
                    exe_verified=not (args.in_container or workload), preload=("LD_PRELOAD",) if args.preload else (),
                    workload=workload, uid_inside=args.uid_inside)  # fmt: skip
    allowed, lines = explain(policy, caller, args.method, args.path, args.sha256)
    print("\n".join(lines))
    return EXIT_OK if allowed else EXIT_FAILURE


def cmd_set_mode(args: argparse.Namespace) -> int:
    """Edit the configuration's mode safely and reload the running agent."""
    from .setmode import set_mode

    print(set_mode(args.config, args.mode, args.pid))
    return EXIT_OK


def cmd_version(args: argparse.Namespace) -> int:
    """Print the version."""
    print(f"imds-agent {__version__}")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    """The argument parser; exposed for tests and the man page."""
    parser = argparse.ArgumentParser(
        prog="imds-agent",
        description="Per-process access control and IMDSv2 token injection for the EC2 metadata service.",
    )
    parser.add_argument(
        "--config",
        default=configmod.DEFAULT_PATH,
        metavar="PATH",
        help=f"agent configuration file (default {configmod.DEFAULT_PATH}; built-in defaults if it is absent)",
    )
    # --config is accepted after the subcommand too (`imds-agent report --config F`); there it overrides.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", default=argparse.SUPPRESS, metavar="PATH", help="agent configuration file")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    p = sub.add_parser(
        "run", parents=[common], help="run the agent in the configuration's mode (what the systemd unit starts)"
    )
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("audit", parents=[common], help="run the agent: allow every caller, record who calls what")
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("enforce", parents=[common], help="run the agent: deny what the policy does not allow")
    p.set_defaults(func=cmd_run)
    p = sub.add_parser(
        "check-config", parents=[common], help="validate the configuration and print the effective settings"
    )
    p.set_defaults(func=cmd_check_config)
    rules = sub.add_parser("rules", parents=[common], help="show, install or remove the kernel redirect rules")
    rsub = rules.add_subparsers(dest="rules_command", metavar="ACTION")
    rsub.required = True
    for action, func, text in (
        ("show", cmd_rules_show, "show the installed rules, their state and packet counters"),
        ("apply", cmd_rules_apply, "install the rules (persistent until removed)"),
        ("remove", cmd_rules_remove, "remove the agent's rules (all backends unless --backend is given)"),
    ):
        p = rsub.add_parser(action, parents=[common], help=text)
        p.add_argument("--backend", choices=BACKEND_NAMES, help="backend to use (default: the configuration's)")
        if action == "show":
            p.add_argument("--json", action="store_true", help="machine-readable output")
        if action == "remove":
            p.add_argument("--if-fail-open", action="store_true", help="do nothing when fail_mode is closed")
        p.set_defaults(func=func)
    p = sub.add_parser("status", parents=[common], help="the running agent's mode, rules, token and totals")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_status)
    p = sub.add_parser("report", parents=[common], help="one row per caller from the recorded inventory")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--hours", type=float, default=0, help="only callers seen in the last N hours")
    p.set_defaults(func=cmd_report)
    p = sub.add_parser("suggest", parents=[common], help="write a policy file allowing exactly what audit recorded")
    p.add_argument("--output", "-o", metavar="FILE", help="where to write (default: stdout); never overwritten")
    p.set_defaults(func=cmd_suggest)
    p = sub.add_parser(
        "explain", parents=[common], help="what enforce mode would decide for a caller and path, and why"
    )
    p.add_argument("--exe", required=True, help="the executable's absolute path")
    p.add_argument("--uid", required=True, type=int)
    p.add_argument("--user", help="user name (default: looked up from the uid)")
    p.add_argument("--path", required=True, help="request path, e.g. /latest/meta-data/iam/security-credentials/")
    p.add_argument("--method", default="GET", choices=("GET", "HEAD", "PUT"))
    p.add_argument("--cmdline", nargs="*", help="the command line, for rules that match on it")
    p.add_argument("--preload", action="store_true",
                   help="the caller ran with LD_PRELOAD or LD_AUDIT (refuse_preload rules skip it)")  # fmt: skip
    p.add_argument("--sha256", help="the executable's hash, for rules that pin one")
    p.add_argument("--in-container", action="store_true",
                   help="the path is inside a container's image, not a file on the host")  # fmt: skip
    c = p.add_argument_group("the container the caller runs in (any of these: --exe is then the path inside it)")
    c.add_argument("--container-image", metavar="REF", help="its image (nginx:1.25 is docker.io/library/nginx:1.25)")
    c.add_argument("--container-name", metavar="NAME", help="its name (in a pod: the container's name in the pod)")
    c.add_argument("--container-runtime", choices=RUNTIMES, help="its runtime (default: unknown, as when not read)")
    c.add_argument("--label", action="append", type=label, metavar="KEY=VALUE", help="a label; repeat for more")
    c.add_argument("--pod-namespace", metavar="NS", help="the Kubernetes namespace of its pod")
    c.add_argument("--pod-name", metavar="NAME", help="its pod's name")
    c.add_argument("--service-account", metavar="NAME", help="its pod's service account (never known to the agent)")
    c.add_argument("--uid-inside", type=int, metavar="N", help="the uid its user namespace shows (for the record)")
    p.set_defaults(func=cmd_explain)
    p = sub.add_parser(
        "set-mode", parents=[common], help="set `mode:` in the configuration file and reload the running agent"
    )
    p.add_argument("mode", choices=configmod.MODES)
    p.add_argument("--pid", type=int, help="signal this agent process (default: systemd, then the pid file)")
    p.set_defaults(func=cmd_set_mode)
    p = sub.add_parser("version", parents=[common], help="print the version")
    p.set_defaults(func=cmd_version)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point: parse arguments, run the subcommand, map AgentError to its exit code and one line."""
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except AgentError as exc:
        print(f"imds-agent: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
