"""``python -m smdist.worker.standby FD AGENT_PID [ARGS]``: a rank's interpreter, started
before its job (ARGS: the agent's own, shown by ``ps``, unread).

The agent starts this first thing (see ``smdist/agent/standby.py``): it imports the
bootstrap, then reads its order from the pipe ``FD``: the bootstrap's arguments, the rank's
environment and working directory, as JSON. It takes them and runs the bootstrap exactly as
``python -m smdist.worker.bootstrap ARGS`` in that environment would. The pipe closed with no
order: not needed, it exits 0. It waits for nothing else, and dies with the agent.
"""

from __future__ import annotations

import json
import os
import sys

from smdist import contract
from smdist.worker import bootstrap  # the rank's own imports, done while the agent plans


def _read_order(fd: int) -> bytes:
    chunks = []
    while True:
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            break
        chunks.append(chunk)
    os.close(fd)
    return b"".join(chunks)


def main() -> None:
    order_fd, agent = int(sys.argv[1]), int(sys.argv[2])
    # Dies with the agent, as every rank (started without a preexec_fn: the agent's start
    # stays a vfork and imports no ctypes). Gone already: it will never have an order.
    if not contract.die_with_parent(agent):
        raise SystemExit(0)
    data = _read_order(order_fd)
    if not data:
        raise SystemExit(0)
    order = json.loads(data)
    os.environ.clear()  # through putenv/unsetenv: what C code reads later sees it too
    os.environ.update(order["env"])
    if os.getcwd() != order["cwd"]:
        os.chdir(order["cwd"])
    bootstrap.main(list(order["args"]))


if __name__ == "__main__":
    main()
