"""Input channels of inputdataconfig.json: File / FastFile directories and Pipe mode epochs.

In Pipe mode SageMaker streams epoch ``k`` of channel ``NAME`` through the named pipe
``<data dir>/NAME_k``; the next pipe appears only after the previous one was closed, so
reading waits for it, with a bounded, declared retry policy.
"""

from __future__ import annotations

import fcntl
import io
import json
import logging
import os
import select
import stat
import struct
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO, Any

from tenacity import (
    RetryError,
    Retrying,
    retry_if_exception_type,
    stop_after_delay,
    wait_exponential,
    wait_random,
)

from smdist.config import TRAINING_INPUT_MODES, Channel, JobConfig, Paths, resolve_root
from smdist.errors import SmdistError

log = logging.getLogger("smdist.channels")

INPUT_DATA_CONFIG_ENV = "SM_INPUT_DATA_CONFIG"
DEFAULT_PIPE_WAIT_S = 120.0
DEFAULT_CHUNK_SIZE = 1 << 20


class ChannelError(SmdistError):
    """An input channel is unknown, malformed, missing, or its pipe never came."""

    category = "ChannelError"


# -- reading without loading an epoch into memory ------------------------------------------


def iter_chunks(stream: IO[bytes], size: int = DEFAULT_CHUNK_SIZE) -> Iterator[bytes]:
    """Blocks of at most ``size`` bytes until EOF (the last one may be shorter)."""
    if size < 1:
        raise ValueError(f"chunk size {size}: expected at least 1 byte")
    while chunk := stream.read(size):
        yield chunk


def iter_lines(stream: IO[bytes], chunk_size: int = DEFAULT_CHUNK_SIZE) -> Iterator[bytes]:
    """Lines without their ``\\n`` (or ``\\r\\n``); a last line without a newline counts too."""
    pending = b""
    for chunk in iter_chunks(stream, chunk_size):
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for line in lines:
            yield line[:-1] if line.endswith(b"\r") else line
    if pending:
        yield pending[:-1] if pending.endswith(b"\r") else pending


RECORDIO_MAGIC = 0xCED7230A


def iter_recordio(stream: IO[bytes]) -> Iterator[bytes]:
    """Records of a ``RecordWrapperType: RecordIO`` channel (MXNet RecordIO framing).

    Each part is: magic, a header with a 3-bit continuation flag and a 29-bit length, the
    data, padding to 4 bytes; a record split in parts is joined back with the magic between.
    """
    record = b""
    while True:
        header = stream.read(8)
        if not header:
            if record:
                raise ChannelError("RecordIO stream ended inside a multi-part record")
            return
        if len(header) < 8:
            raise ChannelError(f"RecordIO stream ended inside a header ({len(header)} of 8 bytes)")
        magic, lrec = struct.unpack("<II", header)
        if magic != RECORDIO_MAGIC:
            raise ChannelError(f"RecordIO: bad magic {magic:#010x} (expected {RECORDIO_MAGIC:#x})")
        flag, length = lrec >> 29, lrec & ((1 << 29) - 1)
        padded = (length + 3) & ~3
        data = stream.read(padded)
        if len(data) < padded:
            raise ChannelError(f"RecordIO stream ended inside a record ({len(data)} of {padded})")
        record += data[:length]
        if flag in (0, 3):  # a whole record, or the last part of one
            yield record
            record = b""
        else:
            record += header[:4]


# -- channels ------------------------------------------------------------------------------


class InputChannel:
    """One channel. ``path`` and ``files()`` for File/FastFile, ``epochs()`` for Pipe."""

    def __init__(self, spec: Channel, directory: Path) -> None:
        self.name = spec.name
        self.mode = spec.training_input_mode
        self.content_type = spec.content_type
        self.spec = spec
        self.path = directory
        """The channel's directory (File, FastFile); in Pipe mode where the pipes live."""

    def files(self) -> list[Path]:
        raise ChannelError(
            f'channel "{self.name}" is in {self.mode} mode: it has no files; use .epochs()'
        )

    def epochs(
        self, count: int | None = None, wait_s: float = DEFAULT_PIPE_WAIT_S
    ) -> Iterator[PipeEpoch]:
        raise ChannelError(
            f'channel "{self.name}" is in {self.mode} mode: read its files under {self.path} '
            "(.files()); .epochs() is for Pipe mode"
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, mode={self.mode}, path={self.path})"


class FileChannel(InputChannel):
    """File and FastFile mode: SageMaker put (or lazily mounts) the objects in a directory."""

    def files(self) -> list[Path]:
        """Every regular file under the channel's directory, recursively, sorted."""
        if not self.path.is_dir():
            raise ChannelError(
                f'channel "{self.name}" ({self.mode} mode): directory {self.path} does not exist'
            )
        found = [
            Path(dirpath, f)
            for dirpath, _dirs, names in os.walk(self.path)
            for f in names
            if Path(dirpath, f).is_file()
        ]
        return sorted(found)


class PipeChannel(InputChannel):
    """Pipe mode: epoch k is the named pipe ``<data dir>/<name>_<k>``."""

    def pipe_path(self, epoch: int) -> Path:
        return self.path.parent / f"{self.name}_{epoch}"

    def epochs(
        self, count: int | None = None, wait_s: float = DEFAULT_PIPE_WAIT_S
    ) -> Iterator[PipeEpoch]:
        """Epoch 0, 1, ... (``count`` of them, or until the consumer stops).

        Each is opened only after the previous one was closed (by the consumer, or here
        when the consumer moves on); ``wait_s`` bounds the wait for a pipe to appear and
        for its writer to connect.
        """
        if count is not None and count < 0:
            raise ValueError(f"count {count}: expected a number of epochs >= 0")
        epoch = 0
        while count is None or epoch < count:
            current = open_pipe(self.pipe_path(epoch), epoch, wait_s)
            try:
                yield current
            finally:
                current.close()
            epoch += 1


def _wait_for_pipe(path: Path, wait_s: float) -> None:
    def exists() -> None:
        st = os.stat(path)  # FileNotFoundError until SageMaker creates it
        if not stat.S_ISFIFO(st.st_mode) and not stat.S_ISREG(st.st_mode):
            raise ChannelError(f"{path}: exists but is neither a named pipe nor a file")

    if path.exists():
        exists()
        return
    log.info("waiting up to %.0f s for pipe %s", wait_s, path)
    retrying = Retrying(
        stop=stop_after_delay(wait_s),
        # Exponential backoff with jitter, spelled so tenacity 8.2 and 9.x read it the same.
        wait=wait_exponential(multiplier=0.02, max=1.0) + wait_random(0, 0.05),
        retry=retry_if_exception_type(FileNotFoundError),
        before_sleep=lambda rs: log.debug(
            "pipe %s not there yet (try %d)", path, rs.attempt_number
        ),
    )
    try:
        retrying(exists)
    except RetryError:
        raise ChannelError(
            f"pipe {path} did not appear within {wait_s:g} s "
            "(was the previous epoch closed? is the channel in Pipe mode?)"
        ) from None


def open_pipe(path: Path, epoch: int = 0, wait_s: float = DEFAULT_PIPE_WAIT_S) -> PipeEpoch:
    """Wait for ``path`` to exist and its writer to connect; return the epoch to read."""
    _wait_for_pipe(path, wait_s)
    # Non-blocking open so the wait for a writer is bounded too; on Linux, poll on a FIFO
    # that never had a writer stays silent (no POLLHUP) until one connects and writes or closes.
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        if stat.S_ISFIFO(os.fstat(fd).st_mode):
            poller = select.poll()
            poller.register(fd, select.POLLIN | select.POLLHUP)
            deadline = time.monotonic() + wait_s
            logged = False
            while True:
                left = deadline - time.monotonic()
                if poller.poll(max(0, int(min(left, 1.0) * 1000))):
                    break
                if time.monotonic() >= deadline:
                    raise ChannelError(
                        f"pipe {path}: no writer sent data within {wait_s:g} s of opening it"
                    )
                if not logged:
                    log.info("waiting up to %.0f s for the writer of pipe %s", wait_s, path)
                    logged = True
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        fcntl.fcntl(fd, fcntl.F_SETFL, flags & ~os.O_NONBLOCK)
        raw = io.FileIO(fd, "rb", closefd=True)
    except BaseException:
        os.close(fd)
        raise
    return PipeEpoch(path, epoch, io.BufferedReader(raw, DEFAULT_CHUNK_SIZE))


class PipeEpoch:
    """One epoch of a Pipe mode channel: a binary stream, read to EOF or closed early."""

    def __init__(self, path: Path, epoch: int, stream: io.BufferedReader) -> None:
        self.path = path
        self.epoch = epoch
        self.stream = stream
        """The underlying binary stream, for readers that want a file object."""

    def read(self, size: int = -1) -> bytes:
        return self.stream.read(size)

    def readline(self) -> bytes:
        return self.stream.readline()

    def iter_chunks(self, size: int = DEFAULT_CHUNK_SIZE) -> Iterator[bytes]:
        return iter_chunks(self.stream, size)

    def iter_lines(self) -> Iterator[bytes]:
        return iter_lines(self.stream)

    def iter_recordio(self) -> Iterator[bytes]:
        return iter_recordio(self.stream)

    def __iter__(self) -> Iterator[bytes]:
        return self.iter_lines()

    def close(self) -> None:
        self.stream.close()

    @property
    def closed(self) -> bool:
        return self.stream.closed

    def __enter__(self) -> PipeEpoch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"PipeEpoch(path={self.path}, epoch={self.epoch})"


# -- where the channel list comes from -----------------------------------------------------


def _parse_channels(data: Any, source: str) -> dict[str, Channel]:
    if not isinstance(data, dict):
        raise ChannelError(f"{source}: expected a JSON object of channel name -> settings")
    result: dict[str, Channel] = {}
    for name, spec in data.items():
        if not isinstance(spec, dict):
            raise ChannelError(f'{source}: channel "{name}": expected an object')
        mode = spec.get("TrainingInputMode", "File")
        if mode not in TRAINING_INPUT_MODES:
            raise ChannelError(
                f'{source}: field "{name}.TrainingInputMode": expected '
                f"{' or '.join(TRAINING_INPUT_MODES)}, got {json.dumps(mode)}"
            )
        ctype = spec.get("ContentType")
        result[name] = Channel(
            name=name,
            training_input_mode=mode,
            content_type=ctype if isinstance(ctype, str) else None,
            raw=spec,
        )
    return result


def _load_specs(
    config: JobConfig | None, environ: Mapping[str, str]
) -> tuple[dict[str, Channel], Paths, str]:
    if config is not None:
        return dict(config.channels), config.paths, str(config.paths.input_data_config_file)
    paths = resolve_root(environ=environ)
    raw = environ.get(INPUT_DATA_CONFIG_ENV)
    if raw:
        try:
            data = json.loads(raw)
        except ValueError as exc:
            raise ChannelError(f"{INPUT_DATA_CONFIG_ENV}: not valid JSON: {exc}") from None
        return _parse_channels(data, INPUT_DATA_CONFIG_ENV), paths, INPUT_DATA_CONFIG_ENV
    source = paths.input_data_config_file
    try:
        text = source.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}, paths, str(source)
    except OSError as exc:
        raise ChannelError(f"{source}: cannot be read: {exc.strerror or exc}") from None
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise ChannelError(f"{source}: not valid JSON: {exc}") from None
    return _parse_channels(data, str(source)), paths, str(source)


def _make(spec: Channel, paths: Paths, environ: Mapping[str, str], from_env: bool) -> InputChannel:
    directory = paths.channel_dir(spec.name)
    env_dir = environ.get(f"SM_CHANNEL_{spec.name.upper()}") if from_env else None
    if env_dir:
        directory = Path(env_dir)
    if spec.training_input_mode == "Pipe":
        return PipeChannel(spec, directory)
    return FileChannel(spec, directory)


def channels(
    config: JobConfig | None = None, environ: Mapping[str, str] | None = None
) -> dict[str, InputChannel]:
    """Every channel of the job: from ``config`` when given, else ``SM_INPUT_DATA_CONFIG``,
    else ``inputdataconfig.json`` under ``SMDIST_OPT_ML`` (or /opt/ml)."""
    env = os.environ if environ is None else environ
    specs, paths, _source = _load_specs(config, env)
    return {name: _make(spec, paths, env, config is None) for name, spec in specs.items()}


def channel(
    name: str, config: JobConfig | None = None, environ: Mapping[str, str] | None = None
) -> InputChannel:
    """The channel called ``name``; a clear error listing the channels when there is none."""
    env = os.environ if environ is None else environ
    specs, paths, source = _load_specs(config, env)
    if name not in specs:
        known = ", ".join(sorted(specs)) or "none"
        raise ChannelError(f'no input channel "{name}" in {source} (channels: {known})')
    return _make(specs[name], paths, env, config is None)
