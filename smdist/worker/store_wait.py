"""Ranks other than 0 wait for rank 0's TCPStore to listen before torch connects to it.

With ``env://`` (or ``tcp://``) rendezvous, rank 0's ``init_process_group`` starts the
TCPStore server and every other rank connects to it. The ranks import torch at the same
time, and whichever finishes first calls ``init_process_group`` first: a rank that gets
there before rank 0 finds nothing listening, and torch's client then sleeps an exponential
backoff with jitter (about 0.5 s, then 0.75 s, 1.1 s, ...) before it tries again. Rank 0's
server is usually up early in that sleep, so the whole job waits out the rest of it: on 2
to 4 ranks, 0.1-0.7 s of every start and every restart (issue 18's time-to-ready).

:func:`install` makes torch's ``_create_c10d_store`` (the function both rendezvous handlers
call) wait first, on a rank that will be a client of rank 0's store: it tries a plain TCP
connection to the store's address every ``POLL_S`` until one is accepted (then closes it:
the store takes it as a client that left), and only then lets torch connect, which now
succeeds on its first try. It waits at most ``WAIT_CAP_S`` (or the store's own timeout, if
shorter), then leaves everything to torch as before: a master that never comes up fails
exactly as it would have, ``WAIT_CAP_S`` later. The patch is applied when the script
imports ``torch.distributed.rendezvous`` (an import hook: torch is never imported for it),
and only there; if torch no longer has that function, nothing is patched.
"""

from __future__ import annotations

import os
import sys
import time

from smdist import contract  # the bootstrap has imported it already

TYPE_CHECKING = False  # not typing's: every rank imports this before its first line
if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from importlib.machinery import ModuleSpec
    from types import ModuleType
    from typing import Any

MODULE = "torch.distributed.rendezvous"
FUNCTION = "_create_c10d_store"
POLL_S = 0.01
"""Between two connection attempts: a refused connection costs microseconds, so polling
this often is cheap, and the rank connects within 10 ms of rank 0's store listening."""
WAIT_CAP_S = 30.0
"""At most this long (past it, torch's own retries take over): the wait is for a race at
start-up, not for a master that is late by minutes."""
ATTEMPT_S = 1.0
"""One connection attempt's bound (a remote rank 0 that drops packets, not one refusing)."""
MARK = "__smdist_store_wait__"
PARAMETERS = ("hostname", "port", "rank", "world_size", "timeout")
"""``_create_c10d_store``'s first parameters, as torch 2.x names them."""

last_wait: dict[str, Any] = {}
"""What the last wait saw (``address``, ``attempts``, ``seconds``, ``listening``): for
tests and for a curious user; empty when no wait ran."""


def wait_listening(host: str, port: int, budget_s: float) -> bool:
    """Until something accepts a TCP connection on ``host:port`` (True), or ``budget_s``
    has passed or the address does not resolve (False). Never raises."""
    started = time.monotonic()
    last_wait.clear()
    last_wait.update(address=f"{host}:{port}", attempts=0, listening=False, seconds=0.0)

    def attempt() -> None:
        last_wait["attempts"] += 1

    try:
        with contract.connect_when_listening(
            host,
            port,
            budget_s,
            lambda _: POLL_S,
            attempt_timeout_s=ATTEMPT_S,
            resolve_once=True,
            on_attempt=attempt,
        ):
            pass  # closed at once: the store takes it for a client that left
    except OSError:
        last_wait["seconds"] = time.monotonic() - started
        return False
    last_wait.update(listening=True, seconds=time.monotonic() - started)
    return True


def _client_of_rank0(rank: object) -> bool:
    """Will this call connect to rank 0's store (rather than start it, or use torchrun's
    agent store, which is up before any rank starts)?"""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        return False
    return isinstance(rank, int) and rank != 0


def _seconds(timeout: object) -> float:
    total = getattr(timeout, "total_seconds", None)
    return float(total()) if callable(total) else WAIT_CAP_S


def wrap(original: Callable[..., Any]) -> Callable[..., Any]:
    """``_create_c10d_store(hostname, port, rank, world_size, timeout, ...)`` that waits
    for rank 0's store first on a client rank; any other call passes straight through."""

    def _create_c10d_store(*args: Any, **kwargs: Any) -> Any:
        try:
            named = dict(zip(PARAMETERS, args, strict=False))
            named.update(kwargs)
            host, port, rank = named.get("hostname"), named.get("port"), named.get("rank")
            if isinstance(host, str) and isinstance(port, int) and _client_of_rank0(rank):
                wait_listening(host, port, min(WAIT_CAP_S, _seconds(named.get("timeout"))))
        except Exception:  # never in the way: torch does what it always did
            pass
        return original(*args, **kwargs)

    setattr(_create_c10d_store, MARK, True)
    _create_c10d_store.__wrapped__ = original  # type: ignore[attr-defined]
    _create_c10d_store.__doc__ = original.__doc__
    return _create_c10d_store


def patch(module: ModuleType) -> bool:
    """Wrap ``module._create_c10d_store`` (once); False when there is none to wrap."""
    original = getattr(module, FUNCTION, None)
    if not callable(original):
        return False
    if not getattr(original, MARK, False):
        setattr(module, FUNCTION, wrap(original))
    return True


class _Loader:
    """The real loader of torch's rendezvous module, then the patch."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def create_module(self, spec: ModuleSpec) -> ModuleType | None:
        create: Callable[[ModuleSpec], ModuleType | None] | None = getattr(
            self.inner, "create_module", None
        )
        return create(spec) if create is not None else None

    def exec_module(self, module: ModuleType) -> None:
        self.inner.exec_module(module)
        patch(module)

    def __getattr__(self, name: str) -> Any:  # get_source, is_package, ...: the real one's
        return getattr(self.inner, name)


class _Finder:
    """Answers for ``torch.distributed.rendezvous`` only: the spec the other finders give,
    with a loader that patches the module once it has run."""

    def find_spec(
        self, name: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        if name != MODULE:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            try:
                spec: ModuleSpec | None = finder.find_spec(name, path, target)
            except Exception:  # the import itself meets it next, as without this finder
                return None
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _Loader(spec.loader)  # type: ignore[assignment]
                return spec
        return None


def install() -> None:
    """Patch torch's rendezvous when the script imports it (now, if it already has)."""
    loaded = sys.modules.get(MODULE)
    if loaded is not None:
        patch(loaded)
        return
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
