"""Who may have what: one Verdict per request from the Client, the request and the policy under the mode in force.

enforce: a request the policy does not allow is denied with a plain-text 403 naming the executable, uid, path and
what decided (a rule with its file and line, or the default); never a secret. audit: everything is forwarded and
the Verdict says what enforce would have done. In both modes a tokenless request relayed by a proxy on the host
(X-Forwarded-For, Forwarded, Via) never gets the agent's token: that is the SSRF pattern IMDSv2 exists to stop,
judged here once so that no later layer needs to look at the headers again. The User-Agent is never used.
"""

from __future__ import annotations

import dataclasses
import pwd
import threading
from typing import Optional

from ..identity.caller import Caller
from ..identity.hashes import ExeHasher
from ..policy.engine import Decision, decide_path
from ..policy.model import Policy
from ..policy.paths import MetadataPath
from .httpio import Request
from .types import Client, Kind, Outcome, Verdict

# Headers that say a proxy relayed the request.
RELAY_HEADERS = ("x-forwarded-for", "forwarded", "via")
SSRF_GUARD = "SSRF guard"


def deny_message(caller: Caller, path: str, decision: Decision) -> str:
    """The body of a 403: enough for the caller's operator to find the rule, nothing secret."""
    who = f"exe={caller.exe} uid={caller.uid}" if caller.known else f"unidentified caller uid={caller.uid}"
    if caller.known and not caller.exe_verified:
        who += " (not the host's file at that path: a container's, or replaced since the process started)"
    if caller.known and caller.preload:
        who += f" (started with {'/'.join(caller.preload)})"
    return f"denied: {who} path={path} by {decision.decided_by}: {decision.reason}"


def is_relayed(req: Request) -> bool:
    """Whether the request carries a header a proxy adds when it relays one."""
    return any(req.has(name) for name in RELAY_HEADERS)


class AccessGate:
    """Judges requests under the current mode and policy (both swappable together at reload)."""

    def __init__(self, mode: str, policy: Policy, hasher: Optional[ExeHasher] = None):
        self._mode = mode
        self._policy = policy
        self.hasher = hasher or ExeHasher()
        self._swap = threading.Lock()
        self._reserved: Optional[tuple[Policy, frozenset[int]]] = None

    @property
    def mode(self) -> str:
        """The mode in force."""
        return self._mode

    @property
    def policy(self) -> Policy:
        """The policy in force."""
        return self._policy

    def reserved_uids(self) -> frozenset[int]:
        """The uids the policy names (rules' uid: and user:), for whom the listener keeps slots in reserve."""
        policy = self._policy
        cached = self._reserved
        if cached is not None and cached[0] is policy:
            return cached[1]
        uids: set[int] = set()
        for rule in policy.rules:
            uids.update(rule.uids)
            for user in rule.users:
                try:
                    uids.add(pwd.getpwnam(user).pw_uid)
                except KeyError:
                    continue
        self._reserved = (policy, frozenset(uids))
        return self._reserved[1]

    def replace(self, mode: str, policy: Policy) -> None:
        """Switch mode and policy together (SIGHUP); requests in flight finish under what they started with."""
        with self._swap:
            self._mode, self._policy = mode, policy

    def judge(self, client: Client, req: Request, path: MetadataPath, kind: Kind) -> Verdict:
        """The one Verdict for ``req`` from ``client``, asking for the classified ``path``."""
        with self._swap:
            mode, policy = self._mode, self._policy
        caller = client.caller
        decision = self._decide(policy, caller, req.method, path)
        relayed = kind is Kind.V1 and is_relayed(req)
        if relayed and decision.allow:
            decision = Decision(False, SSRF_GUARD, "a tokenless request relayed by a proxy", path=decision.path)
        if decision.allow:
            return Verdict(Outcome.ALLOW, mode, decision.inject, decision.decided_by, decision.reason, path)
        outcome = Outcome.DENY if mode == "enforce" else Outcome.WOULD_DENY
        # A would-deny request is forwarded as the caller sent it, with the token only where the policy's own
        # rule would have injected one, and never when it was relayed.
        inject = decision.inject and not relayed
        return Verdict(outcome, mode, inject, decision.decided_by, decision.reason, path, relayed,
                       deny_message(caller, path.display, decision))  # fmt: skip

    def _decide(self, policy: Policy, caller: Caller, method: str, path: MetadataPath) -> Decision:
        """The decision for ``caller``; with a shared socket, allowed only if allowed to every holder."""
        decision = decide_path(policy, caller, method, path, self._digest(policy, caller))
        for other in caller.sharers:
            if not decision.allow:
                break
            theirs = decide_path(policy, other, method, path, self._digest(policy, other))
            if not theirs.allow:
                reason = f"the connection is shared with {other.describe()}: {theirs.reason}"
                decision = Decision(False, theirs.decided_by, reason, path=decision.path)
            elif not theirs.inject:
                decision = dataclasses.replace(decision, inject=False)
        return decision

    def _digest(self, policy: Policy, caller: Caller) -> Optional[str]:
        return self.hasher.of_pid(caller.pid) if policy.needs_hash and caller.pid is not None else None
