"""What a worker printed: the last Python traceback, faulthandler's crash dump, and the
traceback torch elastic's ``@record`` keeps in its error file.

The fallback when no error file exists (the disk was full, a worker started without the
bootstrap, a native crash): the agent keeps each worker's stderr tail.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from smdist import contract

_TB_FILE = contract.Pattern(
    r'^\s*File "(?P<file>[^"]+)", line (?P<line>\d+)(?:, in (?P<func>.+))?$'
)
_FH_FILE = contract.Pattern(r'^\s*File "(?P<file>[^"]+)", line (?P<line>\d+) in (?P<func>.+)$')
_TB_LAST = contract.Pattern(
    r"^(?P<type>[A-Za-z_][\w.]*(?:Error|Exception|Exit|Interrupt|Warning)?)"
    r"(?:: (?P<message>.*))?$"
)
_ERRNO = contract.Pattern(r"^\[Errno (\d+)\] [^:]*(?:: '(.*)')?")


def parse_stderr_traceback(lines: Sequence[str]) -> dict[str, Any] | None:
    """A record from the last Python traceback in a worker's stderr tail.

    The fallback when no error file exists: the disk was full, or a worker was started
    without the bootstrap.
    """
    start = max(
        (i for i, s in enumerate(lines) if s.startswith("Traceback (most recent")), default=-1
    )
    if start < 0:
        return None
    frames: list[dict[str, Any]] = []
    last: re.Match[str] | None = None
    for i, line in enumerate(lines[start + 1 :], start + 1):
        m = _TB_FILE.match(line.rstrip())
        if m:
            code = lines[i + 1].strip() if i + 1 < len(lines) else ""
            frames.append(
                {
                    "file": m["file"],
                    "line": int(m["line"]),
                    "function": m["func"] or "",
                    "code": code,
                }
            )
            continue
        if not line.startswith((" ", "\t")) and line.strip():
            last = _TB_LAST.match(line.rstrip())
            if last:
                break
    if last is None:
        return None
    typ = last["type"].rsplit(".", 1)[-1]
    message = last["message"] or ""
    rec: dict[str, Any] = {"kind": "stderr", "type": typ, "message": message, "frames": frames}
    m = _ERRNO.match(message)
    if m:
        rec["errno"] = int(m.group(1))
        rec["filename"] = m.group(2)
    nm = re.match(r"No module named '([^']+)'", message)
    if nm:
        rec["name"] = nm.group(1)
    return rec


def parse_faulthandler(lines: Sequence[str]) -> list[dict[str, Any]]:
    """The frames of faulthandler's crash dump in a stderr tail, outermost first."""
    headers = [i for i, s in enumerate(lines) if "(most recent call first)" in s]
    current = [i for i in headers if lines[i].startswith("Current thread")]
    # The crashing thread is "Current thread"; other threads' stacks are dumped beside it.
    start = (current or headers or [-1])[-1]
    if start < 0:
        return []
    frames: list[dict[str, Any]] = []
    for line in lines[start + 1 :]:
        m = _FH_FILE.match(line.rstrip())
        if not m:
            break
        frames.append({"file": m["file"], "line": int(m["line"]), "function": m["func"]})
    frames.reverse()
    return [f for f in frames if contract.is_user_file(f["file"])] or frames


def from_torchelastic(data: Mapping[str, Any]) -> dict[str, Any]:
    """An error record from the file torch elastic's ``@record`` writes to
    ``TORCHELASTIC_ERROR_FILE``: ``{"message": {"message": "Type: text", "extraInfo":
    {"py_callstack": traceback, "timestamp": ...}}}``."""
    message = data["message"]
    extra = message.get("extraInfo") if isinstance(message.get("extraInfo"), Mapping) else {}
    callstack = str(extra.get("py_callstack") or "")
    rec = parse_stderr_traceback(callstack.splitlines())
    if rec is None:
        typ, _, text = str(message.get("message", "")).partition(": ")
        rec = {"type": typ or "Exception", "message": text, "frames": []}
    for frame in rec["frames"]:
        frame["user"] = contract.is_user_file(str(frame["file"]))
    rec["kind"] = "torchelastic"
    rec["traceback"] = callstack
    return rec
