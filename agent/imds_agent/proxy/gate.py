"""Who may have what: the caller found once per connection, the policy asked once per request.

enforce: a request the policy does not allow gets 403 with a plain-text answer naming the executable, uid, path
and what decided (a rule with its file and line, or the default); never a secret. audit: everything is forwarded
and the record says what enforce would have done. Either way a tokenless request relayed by a proxy on the host
(X-Forwarded-For, Forwarded, Via) never gets the agent's token: that is the SSRF pattern IMDSv2 exists to stop.
The User-Agent is recorded, never used to decide.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from typing import Any, Optional

from ..identity.caller import Caller
from ..identity.resolver import Identifier
from ..policy.engine import Decision, ExeHasher, decide
from ..policy.model import Policy
from .handler import RELAY_HEADERS, Exchange
from .httpio import HttpError, Request
from .server import Connection

log = logging.getLogger(__name__)


def deny_message(caller: Caller, path: str, decision: Decision) -> str:
    """The body of a 403: enough for the caller's operator to find the rule, nothing secret."""
    who = f"exe={caller.exe} uid={caller.uid}" if caller.known else f"unidentified caller uid={caller.uid}"
    if caller.known and not caller.exe_verified:
        who += " (not the host's file at that path: a container's, or replaced since the process started)"
    return f"denied: {who} path={path} by {decision.decided_by}: {decision.reason}"


class AccessGate:
    """Identifies connections and admits requests under the current mode and policy (both swappable at reload)."""

    def __init__(self, mode: str, policy: Policy, identifier: Optional[Identifier] = None):
        self.mode = mode
        self.policy = policy
        self.identifier = identifier or Identifier()
        self.hasher = ExeHasher()
        self._swap = threading.Lock()

    def replace(self, mode: str, policy: Policy) -> None:
        """Switch mode and policy together (SIGHUP); requests in flight finish under what they started with."""
        with self._swap:
            self.mode, self.policy = mode, policy

    def on_connect(self, conn: Connection) -> None:
        """Identify the client of a new connection; the Caller is reused for its keep-alive requests."""
        dst = conn.context.get("original_dst")
        conn.context["caller"] = self.identifier.identify(conn.peer, conn.local, dst)

    def _decide(self, policy: Policy, caller: Caller, method: str, target: str) -> Decision:
        """The decision for ``caller``; with a shared socket, allowed only if allowed to every holder."""
        decision = decide(policy, caller, method, target, self._digest(policy, caller))
        for other in caller.sharers:
            if not decision.allow:
                break
            theirs = decide(policy, other, method, target, self._digest(policy, other))
            if not theirs.allow:
                reason = f"the connection is shared with {other.describe()}: {theirs.reason}"
                decision = Decision(False, theirs.decided_by, reason, path=decision.path)
            elif not theirs.inject:
                decision = dataclasses.replace(decision, inject=False)
        return decision

    def _digest(self, policy: Policy, caller: Caller) -> Optional[str]:
        return self.hasher.of_pid(caller.pid) if policy.needs_hash and caller.pid is not None else None

    def admit(self, context: dict[str, Any], req: Request, target: str, ex: Exchange) -> bool:
        """Decide; raise HttpError(403) to deny in enforce mode; return whether a v1 request gets the token."""
        with self._swap:
            mode, policy = self.mode, self.policy
        caller: Caller = context.get("caller") or Caller.unknown("connection was not identified")
        decision = self._decide(policy, caller, req.method, target)
        ex.path = decision.path
        ex.decided_by, ex.reason = decision.decided_by, decision.reason
        relayed = ex.kind == "v1" and any(req.has(h) for h in RELAY_HEADERS)
        if relayed and decision.allow:
            decision = Decision(False, "SSRF guard", "a tokenless request relayed by a proxy", path=decision.path)
            ex.decided_by, ex.reason = decision.decided_by, decision.reason
        if decision.allow:
            ex.decision = "allow"
            return decision.inject
        shown = decision.path.display if decision.path is not None else target
        if mode == "enforce":
            ex.decision = "deny"
            raise HttpError(403, deny_message(caller, shown, decision))
        ex.decision = "would-deny"
        return decision.inject
