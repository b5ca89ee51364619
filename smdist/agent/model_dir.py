"""The model dir at the exit barrier: temp files a killed writer left, and the clash check.

SageMaker tars every host's /opt/ml/model into one ``model.tar.gz``; two hosts holding the
same relative path with different content means one file silently wins. Each host's agent
publishes an inventory (relative path, size, sha256) when its workers are done; the master's
agent checks them before the job may succeed.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from smdist import contract
from smdist.contract import Category
from smdist.errors import SmdistError

_HASH_CHUNK = 1 << 20


class ModelDirClash(SmdistError):
    """Two hosts hold the same path in /opt/ml/model with different content."""

    category = Category.MODEL_DIR_CLASH

    def __init__(self, clashes: list[Clash]) -> None:
        self.clashes = list(clashes)
        shown = "; ".join(str(c) for c in self.clashes[:5])
        more = f"; and {len(self.clashes) - 5} more" if len(self.clashes) > 5 else ""
        super().__init__(
            f"{len(self.clashes)} path(s) in the model dir differ between hosts and would "
            f"overwrite each other in model.tar.gz: {shown}{more} "
            '(write with smdist.save(..., scope="leader") or scope="host")'
        )


def _walk(directory: Path) -> Iterator[Path]:
    """Every file name under ``directory`` (symlinked directories are not entered)."""
    if not directory.is_dir():
        return
    for dirpath, _dirnames, filenames in os.walk(directory):
        for fname in filenames:
            yield Path(dirpath, fname)


def remove_temp_files(directory: Path) -> list[Path]:
    """Delete the temp files of writes that never finished (a killed writer).

    Call only when no worker is writing: the agent does, after its workers exit.
    """
    removed = [p for p in _walk(directory) if contract.is_temp_file(p)]
    for p in removed:
        p.unlink(missing_ok=True)
    return removed


Inventory = dict[str, tuple[int, str]]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def inventory(model_dir: Path) -> Inventory:
    """Relative path -> (size, sha256) of every regular file under ``model_dir``.

    Temp files of atomic writes are skipped; symlinks to files count as the file
    (tar follows them the same way as a reader would); symlinked dirs are not entered.
    """
    result: Inventory = {}
    for p in _walk(model_dir):
        if contract.is_temp_file(p):
            continue
        try:
            if not p.is_file():
                continue
            size = p.stat().st_size
            digest = _sha256(p)
        except FileNotFoundError:  # renamed or removed while we walked
            continue
        result[p.relative_to(model_dir).as_posix()] = (size, digest)
    return result


def encode_inventory(inv: Mapping[str, tuple[int, str]]) -> bytes:
    """The inventory as the bytes an agent puts into the rendezvous store."""
    return json.dumps({k: [size, digest] for k, (size, digest) in inv.items()}).encode()


def decode_inventory(data: bytes, host: str) -> Inventory:
    """The inverse of :func:`encode_inventory`; ``host`` names the sender in errors."""
    try:
        raw = json.loads(data)
        return {str(k): (int(v[0]), str(v[1])) for k, v in raw.items()}
    except (ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:
        raise SmdistError(f"model dir inventory from host {host}: malformed ({exc})") from None


@dataclass(frozen=True)
class Clash:
    """One path of model.tar.gz that more than one host would put there."""

    path: str
    hosts: tuple[str, ...]
    identical: bool
    """Same size and hash on every host: harmless duplicate, a warning."""
    detail: str = ""

    def __str__(self) -> str:
        what = "same content" if self.identical else self.detail or "different content"
        return f"{self.path} on hosts {', '.join(self.hosts)} ({what})"


def find_clashes(
    inventories: Mapping[str, Mapping[str, tuple[int, str]]],
) -> tuple[list[Clash], list[Clash]]:
    """(failing clashes, warnings) across the hosts' inventories, sorted by path."""
    holders: dict[str, list[str]] = {}
    for host in sorted(inventories):
        for path in inventories[host]:
            holders.setdefault(path, []).append(host)
    failing: list[Clash] = []
    warnings: list[Clash] = []
    for path in sorted(holders):
        hosts = holders[path]
        if len(hosts) < 2:
            continue
        contents = {tuple(inventories[h][path]) for h in hosts}
        if len(contents) == 1:
            warnings.append(Clash(path, tuple(hosts), identical=True))
        else:
            failing.append(Clash(path, tuple(hosts), identical=False))
    # A file on one host where another has a directory of that name: tar keeps only one.
    dir_holders: dict[str, set[str]] = {}
    for path, hosts in holders.items():
        for parent in PurePosixPath(path).parents:
            if parent.as_posix() in holders:
                dir_holders.setdefault(parent.as_posix(), set()).update(hosts)
    for key in sorted(dir_holders):
        file_hosts = holders[key]
        dir_hosts = sorted(dir_holders[key] - set(file_hosts))
        if dir_hosts:
            failing.append(
                Clash(
                    key,
                    tuple(sorted({*file_hosts, *dir_hosts})),
                    identical=False,
                    detail=f"a file on {', '.join(file_hosts)}, "
                    f"a directory on {', '.join(dir_hosts)}",
                )
            )
    failing.sort(key=lambda c: c.path)
    return failing, warnings


def check_clashes(inventories: Mapping[str, Mapping[str, tuple[int, str]]]) -> list[Clash]:
    """Raise :class:`ModelDirClash` on a failing clash; return the warnings otherwise."""
    failing, warnings = find_clashes(inventories)
    if failing:
        raise ModelDirClash(failing)
    return warnings
