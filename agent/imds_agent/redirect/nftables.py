"""The nftables backend: our own `inet imds_agent` table, applied in one netlink transaction.

Messages are encoded and decoded with pyroute2's nf_tables message classes and exchanged over a netlink socket
this backend owns, so that errors come back per message and the socket's lifetime is under our control:

- ``owned=True`` (fail_mode open) creates the table with NFT_TABLE_F_OWNER. The table then belongs to this
  backend's netlink socket: the kernel deletes it the moment the socket closes, including when the agent is
  killed with SIGKILL, and nobody else can change it meanwhile. So the backend keeps the socket open for its
  lifetime and every later apply, check and remove goes through it.
- ``owned=False`` (fail_mode closed, `rules apply`) creates an ordinary table that outlives the agent.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import struct
import threading
from collections.abc import Iterator
from typing import Any, Optional

from pyroute2.netlink import NETLINK_NETFILTER, NLM_F_ACK, NLM_F_APPEND, NLM_F_CREATE, NLM_F_DUMP, NLM_F_REQUEST
from pyroute2.netlink.nfnetlink import NFNL_SUBSYS_NFTABLES, nfgen_msg
from pyroute2.netlink.nfnetlink.nftsocket import (
    NFT_MSG_DELTABLE,
    NFT_MSG_GETCHAIN,
    NFT_MSG_GETRULE,
    NFT_MSG_GETTABLE,
    NFT_MSG_NEWCHAIN,
    NFT_MSG_NEWRULE,
    NFT_MSG_NEWTABLE,
    nft_chain_msg,
    nft_rule_msg,
    nft_table_msg,
)

from ..errors import RedirectError
from ..privileges import CAP_NET_ADMIN
from . import nftrules
from .base import CheckResult, RedirectSpec, RuleView, State

log = logging.getLogger(__name__)

NFPROTO_INET = 1
NFT_TABLE_F_OWNER = 0x2
SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, NFNLGRP_NFTABLES = 270, 1, 7
PROBE_TABLE = "imds_agent_probe"
NFNL_MSG_BATCH_BEGIN, NFNL_MSG_BATCH_END = 0x10, 0x11
NLMSG_ERROR, NLMSG_DONE = 2, 3
HOOKS = {"prerouting": 0, "input": 1, "forward": 2, "output": 3}
_HEADER = struct.Struct("=IHHII")


def _expr_to_netlink(name: str, attrs: dict[str, Any]) -> dict[str, Any]:
    data: list[tuple[str, Any]] = []
    prefix = f"NFTA_{name.upper()}_"
    for key, value in attrs.items():
        if key == "key":
            value = nftrules.CT_KEYS[value] if name == "ct" else nftrules.META_KEYS[value]
        elif key == "op":
            value = nftrules.CMP_OPS[value]
        elif key == "base":
            value = nftrules.PAYLOAD_BASE[value]
        elif key == "type":
            value = nftrules.TYPES[name][value]
        elif key == "family":
            value = nftrules.NFPROTO[value]
        elif key in ("data", "mask", "xor"):
            value = {"attrs": [("NFTA_DATA_VALUE", bytes.fromhex(value))]}
        data.append((prefix + key.upper(), value))
    if name == "counter":
        data = [("NFTA_COUNTER_BYTES", 0), ("NFTA_COUNTER_PACKETS", 0)]
    return {"attrs": [("NFTA_EXPR_NAME", name), ("NFTA_EXPR_DATA", {"attrs": data})]}


def _name_value(name: str, key: str, raw: Any) -> Any:
    """pyroute2 decodes enum attributes to their kernel names; map them back to nftrules' vocabulary."""
    if isinstance(raw, str):
        if raw.startswith("NFT_REG_"):
            return int(raw.rsplit("_", 1)[1])
        if key == "key" and raw.startswith("NFT_META_"):
            return raw[len("NFT_META_") :].lower()
        if key == "key" and raw.startswith("NFT_CT_"):
            return raw[len("NFT_CT_") :].lower()
        if key == "op" and raw.startswith("NFT_CMP_"):
            return raw[len("NFT_CMP_") :].lower()
        if key == "base" and raw.startswith("NFT_PAYLOAD_"):
            return raw[len("NFT_PAYLOAD_") :].lower().replace("_header", "")
        if key == "type" and name == "nat" and raw.startswith("NFT_NAT_"):
            return raw[len("NFT_NAT_") :].lower()
        if key == "type" and name == "reject" and raw.startswith("NFT_REJECT_"):
            return raw[len("NFT_REJECT_") :].lower()
    if key == "type" and isinstance(raw, int):
        return {v: k for k, v in nftrules.TYPES.get(name, {}).items()}.get(raw, raw)
    if key == "family" and isinstance(raw, int):
        return {v: k for k, v in nftrules.NFPROTO.items()}.get(raw, raw)
    return raw


def _expr_from_netlink(expr: Any) -> tuple[list[Any], Optional[tuple[int, int]]]:
    """A kernel expression in nftrules' vocabulary, and (packets, bytes) for a counter."""
    name = expr.get_attr("NFTA_EXPR_NAME")
    body = expr.get_attr("NFTA_EXPR_DATA")
    attrs: dict[str, Any] = {}
    if body is None:
        return [name, attrs], None
    prefix = f"NFTA_{str(name).upper()}_"
    for nla_name, value in body["attrs"]:
        key = nla_name[len(prefix) :].lower() if nla_name.startswith(prefix) else nla_name.lower()
        if key in ("data", "mask", "xor"):
            attrs[key] = bytes(value.get_attr("NFTA_DATA_VALUE") or b"").hex()
        else:
            attrs[key] = _name_value(str(name), key, value)
    if name == "counter":
        return [name, {}], (int(attrs.get("packets", 0)), int(attrs.get("bytes", 0)))
    return [name, attrs], None


def _describe_op(op: dict[str, Any]) -> str:
    """An operation as a refused batch names it, e.g. 'add chain guard (filter)' or 'add rule ipv6 in guard'."""
    if op["object"] == "chain":
        return f"add chain {op['name']} ({op['type']})"
    if op["object"] == "rule":
        # A kernel without nft_reject_inet refuses the guard's rule (ENOENT): say which expression it needs.
        needs = " (reject with tcp reset: nft_reject_inet)" if op["chain"] == nftrules.GUARD_CHAIN else ""
        return f"add rule {op['family']} in {op['chain']}{needs}"
    return f"{op['op']} {op['object']}"


def _chain_differences(name: str, chain: Any) -> list[str]:
    kind, hook_name, priority = nftrules.CHAINS[name]
    hook = chain.get_attr("NFTA_CHAIN_HOOK")
    found = hook.get_attr("NFTA_HOOK_PRIORITY") if hook is not None else None
    hooknum = hook.get_attr("NFTA_HOOK_HOOKNUM") if hook is not None else None
    if chain.get_attr("NFTA_CHAIN_TYPE") != kind or found != priority or hooknum != HOOKS[hook_name]:
        return [f"chain {name} is not a {kind} chain on {hook_name} at priority {priority}"]
    return []


def _rule_differences(what: str, wanted: dict[str, list[Any]], installed: list[tuple[str, list[Any]]]) -> list[str]:
    """One chain's rules (``installed``: rule key, expressions) against the wanted ones per rule key (the family,
    and the input interface in the container chains)."""
    details: list[str] = []
    for family, exprs in wanted.items():
        found = [e for f, e in installed if f == family]
        if not found:
            details.append(f"{family} {what} is missing")
        elif nftrules.significant(found[0]) != nftrules.significant(exprs):
            details.append(
                f"{family} {what} differs: has '{nftrules.render(found[0])}', wants '{nftrules.render(exprs)}'"
            )
        if len(found) > 1:
            details.append(f"{family} {what} is installed {len(found)} times")
    extra = sorted({f for f, _ in installed if f not in wanted})
    if extra:
        details.append(f"unexpected {what}s for {', '.join(extra)}")
    return details


class NftablesBackend:
    """Redirect with an nftables table of our own, over a netlink socket held for the backend's lifetime."""

    name = "nftables"
    capabilities: tuple[int, ...] = (CAP_NET_ADMIN,)
    containers = True

    def __init__(self) -> None:
        self._sock: Optional[socket.socket] = None
        self._seq = 0
        self._lock = threading.Lock()
        self._reason = ""
        self._owner_support: Optional[bool] = None

    def change_events(self) -> Optional[socket.socket]:
        """A netlink socket that receives the kernel's nf_tables change notifications (NFNLGRP_NFTABLES), so a
        flush is repaired at once instead of at the next poll; None when the subscription is refused."""
        try:
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_NETFILTER)
            sock.bind((0, 0))
            sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, NFNLGRP_NFTABLES)
        except OSError as exc:
            log.warning("no nftables change notifications (%s): rules are checked every reconcile_interval only",
                        exc.strerror or exc)  # fmt: skip
            return None
        return sock

    def can_own(self) -> bool:
        """Whether the kernel honours NFT_TABLE_F_OWNER (Linux 5.12; Amazon Linux 2's and RHEL 8's kernels lack
        it). Probed once, by creating and deleting an owned scratch table in one transaction, which leaves
        nothing behind either way; a kernel without it refuses the flag (EOPNOTSUPP)."""
        if self._owner_support is None:
            attrs: list[Any] = [("NFTA_TABLE_NAME", PROBE_TABLE)]
            create = NLM_F_CREATE | NLM_F_ACK
            ops = [
                ("owned probe table", self._encode(nft_table_msg, NFT_MSG_NEWTABLE,
                                                   attrs + [("NFTA_TABLE_FLAGS", NFT_TABLE_F_OWNER)], create)),
                ("delete probe table", self._encode(nft_table_msg, NFT_MSG_DELTABLE, attrs, NLM_F_ACK)),
            ]  # fmt: skip
            try:
                with self._lock:
                    self._transact(ops)
                self._owner_support = True
            except RedirectError as exc:
                log.warning("nftables cannot tie a table to the agent (%s): fail_mode open uses the guardian", exc)
                self._owner_support = False
        return self._owner_support

    # --- the socket ---------------------------------------------------------------------------------------------
    def _socket(self) -> socket.socket:
        if self._sock is None:
            try:
                sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
                sock.bind((0, 0))
            except OSError as exc:
                raise RedirectError(f"cannot open a netfilter netlink socket: {exc.strerror or exc}") from None
            sock.settimeout(5.0)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            self._sock = sock
        return self._sock

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def _encode(self, cls: Any, msg_type: int, attrs: list[Any], flags: int, family: int = NFPROTO_INET) -> bytes:
        msg = cls()
        msg["nfgen_family"] = family
        msg["attrs"] = attrs
        msg["header"]["type"] = (NFNL_SUBSYS_NFTABLES << 8) | msg_type
        msg["header"]["flags"] = NLM_F_REQUEST | flags
        msg["header"]["sequence_number"] = self._next_seq()
        msg.encode()
        return bytes(msg.data)

    def _batch_marker(self, msg_type: int) -> bytes:
        msg = nfgen_msg()
        msg["res_id"] = NFNL_SUBSYS_NFTABLES
        msg["header"]["type"] = msg_type
        msg["header"]["flags"] = NLM_F_REQUEST
        msg["header"]["sequence_number"] = self._next_seq()
        msg.encode()
        return bytes(msg.data)

    def _messages(self, data: bytes) -> Iterator[tuple[int, int, bytes]]:
        offset = 0
        while offset + _HEADER.size <= len(data):
            length, msg_type, _, seq, _ = _HEADER.unpack_from(data, offset)
            if length < _HEADER.size:
                return
            yield msg_type, seq, data[offset : offset + length]
            offset += (length + 3) & ~3

    def _transact(self, ops: list[tuple[str, bytes]]) -> None:
        """Send ``ops`` as one batch; raise RedirectError naming the first operation the kernel refused."""
        sock = self._socket()
        begin = self._batch_marker(NFNL_MSG_BATCH_BEGIN)
        seqs = {}
        body = b""
        for what, data in ops:
            seqs[_HEADER.unpack_from(data)[3]] = what
            body += data
        sock.send(begin + body + self._batch_marker(NFNL_MSG_BATCH_END))
        pending = set(seqs)
        failure: Optional[str] = None
        try:
            while pending:
                for msg_type, seq, raw in self._messages(sock.recv(1 << 16)):
                    if msg_type != NLMSG_ERROR or seq not in pending:
                        continue
                    pending.discard(seq)
                    code = -struct.unpack_from("=i", raw, _HEADER.size)[0]
                    if code and failure is None:
                        failure = f"{seqs[seq]}: {os.strerror(code)}"
                        if code in (errno.EPERM, errno.EACCES):
                            failure += " (needs CAP_NET_ADMIN; or the table is owned by another running agent)"
                        pending.clear()  # the kernel aborts the batch: no further answers
        except socket.timeout:
            failure = failure or "no answer from the kernel within 5 s"
        if failure is not None:
            raise RedirectError(f"nftables transaction refused at {failure}")

    def _dump(self, cls: Any, msg_type: int, attrs: list[Any]) -> list[Any]:
        sock = self._socket()
        sock.send(self._encode(cls, msg_type, attrs, NLM_F_DUMP | NLM_F_ACK))
        out: list[Any] = []
        while True:
            for kind, _, raw in self._messages(sock.recv(1 << 16)):
                if kind == NLMSG_DONE:
                    return out
                if kind == NLMSG_ERROR:
                    code = -struct.unpack_from("=i", raw, _HEADER.size)[0]
                    if code == 0:
                        continue
                    if code == errno.ENOENT:
                        return out
                    raise RedirectError(f"nftables listing failed: {os.strerror(code)}")
                msg = cls(raw)
                msg.decode()
                out.append(msg)

    # --- the protocol -------------------------------------------------------------------------------------------
    def is_supported(self) -> bool:
        """Whether nf_tables answers a table listing here."""
        try:
            with self._lock:
                self._dump(nft_table_msg, NFT_MSG_GETTABLE, [])
        except RedirectError as exc:
            self._reason = str(exc)
            if "Protocol not supported" in self._reason or "not supported" in self._reason:
                self._reason = "the kernel has no nf_tables (CONFIG_NF_TABLES, CONFIG_NFT_NAT)"
            return False
        except OSError as exc:
            self._reason = f"nf_tables netlink: {exc.strerror or exc}"
            return False
        return True

    def unsupported_reason(self) -> str:
        """What is missing, after is_supported() said no."""
        return self._reason

    def apply(self, spec: RedirectSpec, owned: bool = False) -> None:
        """Replace our table with the one ``spec`` describes, in one transaction."""
        ops: list[tuple[str, bytes]] = []
        create = NLM_F_CREATE | NLM_F_APPEND | NLM_F_ACK
        for op in nftrules.build_ruleset(spec, owned):
            what = _describe_op(op)
            if op["object"] == "table":
                attrs: list[Any] = [("NFTA_TABLE_NAME", op["name"])]
                if op["op"] == "delete":
                    ops.append((what, self._encode(nft_table_msg, NFT_MSG_DELTABLE, attrs, NLM_F_ACK)))
                    continue
                if op["flags"]:
                    attrs.append(("NFTA_TABLE_FLAGS", NFT_TABLE_F_OWNER))
                ops.append((what, self._encode(nft_table_msg, NFT_MSG_NEWTABLE, attrs, create)))
            elif op["object"] == "chain":
                hook = {"attrs": [("NFTA_HOOK_HOOKNUM", HOOKS[op["hook"]]), ("NFTA_HOOK_PRIORITY", op["priority"])]}
                attrs = [
                    ("NFTA_CHAIN_TABLE", op["table"]),
                    ("NFTA_CHAIN_NAME", op["name"]),
                    ("NFTA_CHAIN_HOOK", hook),
                    ("NFTA_CHAIN_POLICY", 1),
                    ("NFTA_CHAIN_TYPE", op["type"]),
                ]
                ops.append((what, self._encode(nft_chain_msg, NFT_MSG_NEWCHAIN, attrs, create)))
            else:
                exprs = [_expr_to_netlink(name, a) for name, a in op["expr"]]
                attrs = [("NFTA_RULE_TABLE", op["table"]), ("NFTA_RULE_CHAIN", op["chain"]),
                         ("NFTA_RULE_EXPRESSIONS", exprs), ("NFTA_RULE_USERDATA", op["comment"])]  # fmt: skip
                ops.append((what, self._encode(nft_rule_msg, NFT_MSG_NEWRULE, attrs, create)))
        with self._lock:
            self._transact(ops)

    def remove(self) -> bool:
        """Delete our table if it exists."""
        with self._lock:
            if self._table() is None:
                return False
            attrs = [("NFTA_TABLE_NAME", nftrules.TABLE)]
            self._transact([("delete table", self._encode(nft_table_msg, NFT_MSG_DELTABLE, attrs, NLM_F_ACK))])
        return True

    def _table(self) -> Optional[Any]:
        for msg in self._dump(nft_table_msg, NFT_MSG_GETTABLE, []):
            if msg.get_attr("NFTA_TABLE_NAME") == nftrules.TABLE and msg["nfgen_family"] == NFPROTO_INET:
                return msg
        return None

    def check(self, spec: Optional[RedirectSpec] = None) -> CheckResult:
        """Read our table back and compare it with ``spec``."""
        with self._lock:
            table = self._table()
            if table is None:
                return CheckResult(self.name, State.ABSENT, ("table inet imds_agent is missing",))
            flags = int(table.get_attr("NFTA_TABLE_FLAGS") or 0)
            chains = [
                c
                for c in self._dump(nft_chain_msg, NFT_MSG_GETCHAIN, [("NFTA_CHAIN_TABLE", nftrules.TABLE)])
                if c.get_attr("NFTA_CHAIN_TABLE") == nftrules.TABLE and c["nfgen_family"] == NFPROTO_INET
            ]
            rules = [
                r
                for r in self._dump(nft_rule_msg, NFT_MSG_GETRULE, [("NFTA_RULE_TABLE", nftrules.TABLE)])
                if r.get_attr("NFTA_RULE_TABLE") == nftrules.TABLE and r["nfgen_family"] == NFPROTO_INET
            ]
        views: list[RuleView] = []
        installed: list[tuple[str, str, list[Any]]] = []
        for rule in rules:
            exprs: list[Any] = []
            counters: tuple[Optional[int], Optional[int]] = (None, None)
            for expr in rule.get_attr("NFTA_RULE_EXPRESSIONS") or []:
                item, found = _expr_from_netlink(expr)
                exprs.append(item)
                if found is not None:
                    counters = found
            family = nftrules.rule_family(exprs) or "?"
            installed.append((str(rule.get_attr("NFTA_RULE_CHAIN")), nftrules.rule_key(exprs), exprs))
            views.append(RuleView(family, nftrules.render(exprs), counters[0], counters[1]))
        details = self._differences(spec, chains, installed) if spec is not None else []
        state = State.PARTIAL if details else State.PRESENT
        return CheckResult(self.name, state, tuple(details), tuple(views), bool(flags & NFT_TABLE_F_OWNER))

    @staticmethod
    def _differences(spec: RedirectSpec, chains: list[Any], installed: list[tuple[str, str, list[Any]]]) -> list[str]:
        """What differs from ``spec``, chain by chain: ``installed`` is (chain, rule key, expressions) per rule."""
        details: list[str] = []
        by_name = {c.get_attr("NFTA_CHAIN_NAME"): c for c in chains}
        expected = nftrules.expected_chains(spec)
        for name, wanted in expected.items():
            if name not in by_name:
                details.append(f"chain {name} is missing")
                continue
            details.extend(_chain_differences(name, by_name[name]))
            rules = [(family, exprs) for chain, family, exprs in installed if chain == name]
            details.extend(_rule_differences("rule" if name == nftrules.CHAIN else f"{name} rule", wanted, rules))
        # A chain of ours the spec does not ask for (containers switched off since): a repair drops it.
        details.extend(f"chain {name} is not wanted" for name in sorted(set(by_name) - set(expected)))
        return details

    def close(self) -> None:
        """Close the netlink socket (which removes an owned table)."""
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None
