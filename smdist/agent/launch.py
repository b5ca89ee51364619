"""The console scripts ``smdist-run`` and ``train``: the first rank's interpreter is started
before the agent imports anything else (``smdist/agent/standby.py``), then the agent runs.

``python -m smdist.agent.launch`` is ``smdist-run``; ``python -m smdist.agent.cli`` is the same
agent without the standby interpreter.
"""

from __future__ import annotations

import sys

from smdist.agent import standby

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """``smdist-run [OPTIONS] SCRIPT.py|-m MODULE|PROGRAM [ARGS...]``."""
    return _with_standby(argv, train=False)


def train_main(argv: Sequence[str] | None = None) -> int:
    """``train``: SageMaker's ``docker run IMAGE train``."""
    return _with_standby(argv, train=True)


def _with_standby(argv: Sequence[str] | None, *, train: bool) -> int:
    standby.start(sys.argv[1:] if argv is None else argv)
    try:
        from smdist.agent import cli  # after the start: the agent's imports run beside it

        return cli.train_main(argv) if train else cli.main(argv)
    finally:
        standby.discard()


if __name__ == "__main__":
    raise SystemExit(main())
