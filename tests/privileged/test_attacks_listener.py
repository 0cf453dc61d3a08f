"""The listener must be the agent's alone: a local user who took its port while the agent restarted used to make
the new agent fail to start (exit 1), and with fail_mode closed then answered every redirected client itself."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator

import pytest

from imds_agent.config import ListenConfig
from imds_agent.errors import EXIT_RUNTIME
from imds_agent.sandbox.agentproc import AgentProcess
from imds_agent.sandbox.netns import Sandbox

pytestmark = pytest.mark.privileged
OTHER = 1001
BIND = "import socket, sys\ns = socket.socket()\ns.bind(('127.0.0.1', int(sys.argv[1])))\ns.listen()\nprint('bound')\n"
HOLD = BIND + "sys.stdout.flush()\nimport time\ntime.sleep(60)\n"


@pytest.fixture
def sbx() -> Iterator[Sandbox]:
    with Sandbox() as sandbox:
        yield sandbox


def test_an_ordinary_user_cannot_take_the_agents_port(sbx: Sandbox) -> None:
    port = ListenConfig().port
    out = sbx.run(["/usr/bin/python3", "-c", BIND, str(port)], uid=OTHER)
    assert out.returncode != 0 and "PermissionError" in out.stderr, out.stdout + out.stderr


def test_a_taken_port_is_exit_70_naming_the_process_that_holds_it(sbx: Sandbox) -> None:
    port = ListenConfig().port
    holder = sbx.spawn(["/usr/bin/python3", "-c", HOLD, str(port)], stdout=subprocess.PIPE)
    assert holder.stdout is not None and holder.stdout.readline().strip() == "bound"
    agent = AgentProcess(sbx, mode="enforce")
    with pytest.raises(RuntimeError, match=f"exited with {EXIT_RUNTIME}"):
        agent.start(timeout=10)
    log = agent.log()
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use (held by /usr/bin/python3" in log, log
    assert f"pid={holder.pid}" in log
    holder.kill()
    holder.wait(5)
    time.sleep(0.1)
    agent.start()  # the port is free again: the agent starts
    agent.stop()
