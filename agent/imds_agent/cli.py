"""The imds-agent command line: argparse subcommands that call into the package; nothing else lives here."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import Optional

from . import __version__
from . import config as configmod
from .errors import EXIT_OK, AgentError

log = logging.getLogger("imds_agent")


def _load(args: argparse.Namespace) -> configmod.Config:
    return configmod.load(args.config, required=args.config != configmod.DEFAULT_PATH)


def cmd_run(args: argparse.Namespace) -> int:
    """audit / enforce: start the agent in that mode (overriding the config file's mode)."""
    from . import daemon

    config = _load(args).with_mode(args.command)
    return daemon.run(config)


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
    print(f"policy: {config.policy.dir}, default {config.policy.default}")
    print(f"audit: {config.audit.log}, state {config.audit.state_dir}")
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
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    p = sub.add_parser("audit", help="run the agent: allow every caller, record who calls what")
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("enforce", help="run the agent: deny what the policy does not allow")
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("check-config", help="validate the configuration and print the effective settings")
    p.set_defaults(func=cmd_check_config)
    p = sub.add_parser("version", help="print the version")
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
