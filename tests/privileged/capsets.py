"""Reading a process's capability sets from /proc/PID/status, in the names the agent's privileges module uses."""

from __future__ import annotations

from imds_agent.privileges import CAP_NAMES


def held_caps(mask: str) -> set[str]:
    """The capabilities in a hex mask as short names (net_admin, ...); fails on any the agent never asks for."""
    bits = int(mask, 16)
    held = {name.removeprefix("CAP_").lower() for bit, name in CAP_NAMES.items() if bits >> bit & 1}
    assert bits == sum(1 << bit for bit in CAP_NAMES if bits >> bit & 1), f"capabilities beyond the agent's: {mask}"
    return held
