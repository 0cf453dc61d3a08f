"""The test bed the attack tests share: a sandbox with one policy file (and any helper scripts) in place."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Optional

from imds_agent.sandbox.netns import Sandbox


@contextmanager
def policy_sandbox(policy: str, files: Optional[dict[str, str]] = None) -> Iterator[Sandbox]:
    """A started Sandbox whose policy.d holds ``policy`` as 50-test.yaml, with ``files`` written in its workdir."""
    with Sandbox() as sandbox:
        os.makedirs(os.path.join(sandbox.workdir, "policy.d"))
        with open(os.path.join(sandbox.workdir, "policy.d", "50-test.yaml"), "w", encoding="utf-8") as fh:
            fh.write(policy)
        for name, text in (files or {}).items():
            with open(os.path.join(sandbox.workdir, name), "w", encoding="utf-8") as fh:
                fh.write(text)
        yield sandbox
