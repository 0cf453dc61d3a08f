"""`imds-agent explain`: what the policy decides for a caller described on the command line, and why, in the
lines an operator reads. Pure: the command line builds the caller, this decides and words it.

Everything shown that a caller or a container could have chosen (an executable's path, a container's name, image
or labels) is escaped, so an explanation pasted from a ticket cannot hide a line.
"""

from __future__ import annotations

from typing import Optional

from ..identity.caller import Caller, ContainerInfo, printable
from ..identity.containers import describe_workload, normalize_image
from .engine import decide
from .model import Policy

#: The id a described container gets (the agent knows real ones from the runtime's state).
EXPLAINED_ID = "(explain)"


def label(text: str) -> tuple[str, str]:
    """KEY=VALUE as a label; ValueError when there is no '=' or no key (argparse then names the option and says
    'invalid label value')."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ValueError(f"{text!r} is not KEY=VALUE")
    return key, value


def described_container(
    image: Optional[str] = None,
    name: Optional[str] = None,
    runtime: Optional[str] = None,
    labels: Optional[list[tuple[str, str]]] = None,
    pod_namespace: Optional[str] = None,
    pod_name: Optional[str] = None,
    service_account: Optional[str] = None,
) -> Optional[ContainerInfo]:
    """The container the options describe, as the agent would see it (its image in full, its labels sorted, the
    runtime 'unknown' unless named); None when no option was given."""
    given = (image, name, runtime, labels, pod_namespace, pod_name, service_account)
    if all(v is None for v in given):
        return None
    return ContainerInfo(EXPLAINED_ID, runtime or "unknown", name or "", normalize_image(image or ""),
                         tuple(sorted(dict(labels or ()).items())), pod_namespace or "", pod_name or "",
                         service_account or "")  # fmt: skip


def explain(
    policy: Policy, caller: Caller, method: str, target: str, exe_sha256: Optional[str] = None
) -> tuple[bool, list[str]]:
    """Whether enforce would allow ``caller`` ``method target``, and the lines that say so and why; for a caller
    in a container, also each container rule that passed it by and the field that did not match."""
    decision = decide(policy, caller, method, target, exe_sha256)
    shown = decision.path.display if decision.path is not None else target
    lines = [f"{'allow' if decision.allow else 'deny'}: {printable(caller.exe or '?')} (uid {caller.uid}) {method} "
             f"{printable(shown)}"]  # fmt: skip
    w = caller.workload
    if w is not None:
        lines.append(f"  in: {describe_workload(w, caller.uid_inside)}")
        if w.labels:
            lines.append(f"  labels: {printable(', '.join(f'{k}={v}' for k, v in w.labels), 2048)}")
    lines += [f"  decided by: {decision.decided_by}", f"  because: {decision.reason}"]
    for rule in policy.rules:
        missed = rule.workload.mismatch(w) if rule.workload is not None and w is not None else None
        if missed is not None and rule.workload is not None:
            field = missed.replace("_", " ")
            lines.append(f"  not {rule.name} [{rule.source}]: the container's {field} does not match "
                         f"({printable(rule.workload.describe())})")  # fmt: skip
    if decision.allow and not decision.inject:
        lines.append("  note: no token is injected for this caller (inject_token: false); it must speak IMDSv2")
    return decision.allow, lines
