"""The typed records one request passes through: accept -> identify (Client) -> decide (Verdict) -> answer (Answer).

Each layer hands the next a frozen record and never reaches back: the server makes a Client once per connection,
the gate turns a Client and a request into one Verdict, the forwarder acts on the Verdict and describes what it
sent back in one Answer, and the recorder turns that Answer into the audit line, the inventory count, the running
totals and the journal line. None of them holds a header value other than the User-Agent (recorded, never used
to decide), so no record can carry a token or a credential.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Optional

from ..identity.caller import Caller
from ..policy.paths import MetadataPath, shown

Address = tuple[str, int]


class Outcome(enum.Enum):
    """What became of one request; the value is what records and reports show."""

    ALLOW = "allow"
    DENY = "deny"  # enforce mode: the policy does not allow it (403)
    WOULD_DENY = "would-deny"  # audit mode: forwarded, but enforce would have denied it
    REFUSED = "refused"  # the agent's own checks answered it (400/403/405/408/431/503) before any policy


class Kind(enum.Enum):
    """Which IMDS protocol a request speaks."""

    V1 = "v1"  # no token: the agent injects its own
    V2 = "v2"  # the client's own token
    TOKEN = "token"  # the token PUT
    INVALID = "invalid"  # no request could be parsed


@dataclass(frozen=True)
class Client:
    """One accepted connection and the process found behind it (taken once, reused for keep-alive requests).

    ``original_dst`` is what the client dialled before the redirect (None for a direct connection to the
    listener); ``identified_at`` is the wall-clock time the caller was looked up.
    """

    peer: Address
    local: Address
    original_dst: Optional[Address]
    caller: Caller
    identified_at: float
    identify_seconds: float = 0.0  # what finding the caller took
    # Why every request on this connection is refused in every mode, never judged or forwarded: set for a
    # connection on the container listener that no local container made ('' : none).
    refused: str = ""

    @classmethod
    def unidentified(cls, peer: Address, local: Address, reason: str, when: float, uid: Optional[int] = None) -> Client:
        """A client the agent did not (or could not) identify; it is trusted as nobody."""
        return cls(peer, local, None, Caller.unknown(reason, uid), when)


@dataclass(frozen=True)
class Verdict:
    """The gate's one answer for one request under the mode in force.

    ``inject`` says whether a tokenless request gets the agent's token; it is False for a request relayed by a
    proxy on the host (``relayed``) in either mode, and for callers whose rule says they must speak IMDSv2.
    ``message`` is the 403 body for DENY (names exe, uid, path and what decided; never a secret).
    """

    outcome: Outcome
    mode: str
    inject: bool
    decided_by: str
    reason: str
    path: MetadataPath  # the classified path the request asked for (what cannot be classified never gets here)
    relayed: bool = False
    message: str = ""

    @property
    def forwards(self) -> bool:
        """Whether the request goes to the metadata service (everything but a denial)."""
        return self.outcome is not Outcome.DENY


@dataclass(frozen=True)
class Answer:
    """One answer the agent sent (or tried to send): the single source of every record about a request.

    ``path`` is the normalized path the policy judged, when the target could be read as one; ``shown_path`` is
    what logs and records show (never the query string, where a client may put anything). ``cause`` names why
    the agent answered an error itself; ``sent`` is False when the answer could not be written to the client.
    """

    time: float
    mode: str
    client: Client
    method: str
    target: str
    kind: Kind
    status: int
    outcome: Outcome
    decided_by: str = ""
    reason: str = ""
    path: Optional[MetadataPath] = None
    injected: bool = False
    relayed: bool = False
    retried: bool = False
    cause: Optional[str] = None
    latency: float = 0.0
    user_agent: Optional[str] = None
    sent: bool = True
    cached: bool = False  # answered from the agent's cache of metadata answers (imds/cache.py)

    @property
    def caller(self) -> Caller:
        """The process behind the connection."""
        return self.client.caller

    @property
    def shown_path(self) -> str:
        """The path as logs and records show it: normalized when it could be, never the query string."""
        if self.path is not None:
            return self.path.display
        return shown(self.target.partition("?")[0], limit=200, quoted=False)
