"""How much of the audit log one user may fill: a token bucket per uid, and a summary of what it suppressed.

Without a bound, one local user sending requests with a large User-Agent rotated every earlier record out of all
the audit files in well under a minute. Each uid but root's (root can remove the log anyway) may write ``burst``
lines at once and ``rate`` a second after that; past it the lines are counted, not written, and the next line
that uid may write is preceded by one summary record of what was suppressed (how many, of which decisions,
between when and when). Unidentified callers share one bucket.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Optional

from ..identity.caller import share_owner as owner

# Buckets for this many distinct uids at most; past it the quietest one is forgotten (most tokens left, nothing
# suppressed): forgetting a bucket a uid has emptied would hand a flooding uid a fresh burst.
MAX_BUCKETS = 4096


@dataclass(frozen=True)
class Suppressed:
    """What one uid's records lost to the budget between ``first`` and ``last`` (wall-clock times)."""

    uid: Optional[int]
    count: int
    first: float
    last: float
    decisions: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, object]:
        """The JSON-ready summary record."""
        who = owner(self.uid)
        return {
            "time": _iso(self.last),
            "summary": f"{self.count} similar requests from {who} suppressed (audit budget)",
            "uid": self.uid,
            "suppressed": self.count,
            "since": _iso(self.first),
            "until": _iso(self.last),
            "decisions": dict(sorted(self.decisions.items())),
        }


@dataclass
class _Bucket:
    tokens: float
    stamp: float
    count: int = 0
    first: float = 0.0
    last: float = 0.0
    decisions: Counter[str] = field(default_factory=Counter)


class AuditBudget:
    """Thread-safe per-uid admission of audit lines; ``rate`` 0 admits everything."""

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic):
        self.rate = rate
        self.burst = max(burst, 1)
        self.clock = clock
        self._buckets: dict[Optional[int], _Bucket] = {}
        self._lock = threading.Lock()
        self.suppressed = 0

    def admit(self, uid: Optional[int], decision: str, when: float) -> tuple[bool, Optional[Suppressed]]:
        """Whether this uid's line may be written now, and the summary to write before it if lines were lost."""
        if self.rate <= 0 or uid == 0:
            return True, None
        now = self.clock()
        with self._lock:
            bucket = self._buckets.get(uid)
            if bucket is None:
                if len(self._buckets) >= MAX_BUCKETS:
                    quiet = max(self._buckets, key=lambda k: (not self._buckets[k].count, self._buckets[k].tokens))
                    del self._buckets[quiet]
                bucket = self._buckets[uid] = _Bucket(float(self.burst), now)
            bucket.tokens = min(float(self.burst), bucket.tokens + (now - bucket.stamp) * self.rate)
            bucket.stamp = now
            if bucket.tokens < 1:
                if not bucket.count:
                    bucket.first = when
                bucket.count += 1
                bucket.last = when
                bucket.decisions[decision] += 1
                self.suppressed += 1
                return False, None
            bucket.tokens -= 1
            return True, self._take(uid, bucket)

    def pending(self) -> list[Suppressed]:
        """Every summary not yet written (at stop, so that nothing is lost without a trace)."""
        with self._lock:
            return [s for uid, b in self._buckets.items() if (s := self._take(uid, b)) is not None]

    @staticmethod
    def _take(uid: Optional[int], bucket: _Bucket) -> Optional[Suppressed]:
        if not bucket.count:
            return None
        summary = Suppressed(uid, bucket.count, bucket.first, bucket.last, dict(bucket.decisions))
        bucket.count = 0
        bucket.decisions = Counter()
        return summary


def _iso(when: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(when)) + f".{int(when % 1 * 1000):03d}Z"
