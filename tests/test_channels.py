"""Input channels: File/FastFile directories, and Pipe mode through real named pipes fed by
a real writer process, as SageMaker's pipe agent would."""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from smdist import config
from smdist.worker.channels import (
    RECORDIO_MAGIC,
    ChannelError,
    PipeChannel,
    channel,
    channels,
    iter_lines,
    iter_recordio,
)

# Stands in for SageMaker's pipe agent: epoch k is the FIFO <dir>/<name>_k, created only
# after the previous epoch is over, after a delay (the next S3 stream being set up).
WRITER = r"""
import os, sys, time
data_dir, name = sys.argv[1], sys.argv[2]
records, epochs, big = int(sys.argv[3]), int(sys.argv[4]), sys.argv[5] == "big"
for k in range(epochs):
    if k:
        time.sleep(0.5)
    path = os.path.join(data_dir, f"{name}_{k}")
    os.mkfifo(path)
    try:
        with open(path, "wb") as f:  # blocks until the reader opens the pipe
            if big and k == 0:
                for _ in range(256):
                    f.write(b"x" * 65536)
            for i in range(records):
                f.write(f"epoch {k} record {i}\n".encode())
        print(f"epoch {k} complete", flush=True)
    except BrokenPipeError:
        print(f"epoch {k} closed early by the reader", flush=True)
"""


def _env(root: Path, spec: dict[str, object]) -> dict[str, str]:
    return {"SMDIST_OPT_ML": str(root), "SM_INPUT_DATA_CONFIG": json.dumps(spec)}


def _start_writer(
    data_dir: Path, name: str, records: int, epochs: int = 2, big: bool = False
) -> subprocess.Popen[str]:
    data_dir.mkdir(parents=True, exist_ok=True)
    size = "big" if big else "small"
    return subprocess.Popen(
        [sys.executable, "-c", WRITER, str(data_dir), name, str(records), str(epochs), size],
        stdout=subprocess.PIPE,
        text=True,
    )


def test_pipe_mode_reads_two_epochs_in_order_waiting_for_the_second(tmp_path: Path) -> None:
    env = _env(tmp_path, {"train": {"TrainingInputMode": "Pipe"}})
    writer = _start_writer(tmp_path / "input" / "data", "train", records=500)
    try:
        ch = channel("train", environ=env)
        assert isinstance(ch, PipeChannel)
        seen = [(e.epoch, list(e.iter_lines())) for e in ch.epochs(count=2, wait_s=30)]
    finally:
        out, _ = writer.communicate(timeout=30)
    assert [epoch for epoch, _ in seen] == [0, 1]
    for epoch, lines in seen:
        assert lines == [f"epoch {epoch} record {i}".encode() for i in range(500)]
    assert out.splitlines() == ["epoch 0 complete", "epoch 1 complete"]
    assert writer.returncode == 0


def test_pipe_epoch_closed_early_moves_on_to_the_next(tmp_path: Path) -> None:
    env = _env(tmp_path, {"train": {"TrainingInputMode": "Pipe"}})
    # Epoch 0 is 16 MiB, far more than a pipe buffers: the writer is mid-stream when we stop.
    writer = _start_writer(tmp_path / "input" / "data", "train", records=3, big=True)
    try:
        epochs = channel("train", environ=env).epochs(wait_s=30)
        first = next(epochs)
        chunks = first.iter_chunks(4096)
        assert next(chunks) == b"x" * 4096
        second = next(epochs)  # closes epoch 0 for us
        assert first.closed
        assert second.read() == b"".join(f"epoch 1 record {i}\n".encode() for i in range(3))
        epochs.close()
        assert second.closed
    finally:
        out, _ = writer.communicate(timeout=30)
    assert out.splitlines() == ["epoch 0 closed early by the reader", "epoch 1 complete"]


def test_iter_chunks_never_returns_more_than_asked(tmp_path: Path) -> None:
    env = _env(tmp_path, {"train": {"TrainingInputMode": "Pipe"}})
    writer = _start_writer(tmp_path / "input" / "data", "train", records=2000, epochs=1)
    try:
        [chunks] = [list(e.iter_chunks(1000)) for e in channel("train", environ=env).epochs(1)]
    finally:
        writer.communicate(timeout=30)
    assert chunks and all(len(c) <= 1000 for c in chunks)
    assert b"".join(chunks) == b"".join(f"epoch 0 record {i}\n".encode() for i in range(2000))


def test_pipe_that_never_appears_is_named_in_the_error(tmp_path: Path) -> None:
    env = _env(tmp_path, {"eval": {"TrainingInputMode": "Pipe"}})
    epochs = channel("eval", environ=env).epochs(wait_s=0.3)
    with pytest.raises(ChannelError) as err:
        next(epochs)
    assert str(tmp_path / "input" / "data" / "eval_0") in str(err.value)
    assert "did not appear within 0.3 s" in str(err.value)


def test_pipe_without_a_writer_is_a_bounded_wait(tmp_path: Path) -> None:
    env = _env(tmp_path, {"eval": {"TrainingInputMode": "Pipe"}})
    pipe = tmp_path / "input" / "data" / "eval_0"
    pipe.parent.mkdir(parents=True)
    os.mkfifo(pipe)
    with pytest.raises(ChannelError, match=r"no writer sent data within 0\.3 s") as err:
        next(channel("eval", environ=env).epochs(wait_s=0.3))
    assert str(pipe) in str(err.value)


def test_file_and_fastfile_channels_list_their_files(tmp_path: Path) -> None:
    spec = {
        "train": {"TrainingInputMode": "File", "ContentType": "text/csv"},
        "valid": {"TrainingInputMode": "FastFile"},
        "stream": {"TrainingInputMode": "Pipe"},
    }
    env = _env(tmp_path, spec)
    train = tmp_path / "input" / "data" / "train"
    (train / "part" / "b").mkdir(parents=True)
    for rel in ("z.csv", "a.csv", "part/b/m.csv"):
        (train / rel).write_text(rel)
    # SM_CHANNEL_<NAME> wins over the default directory, as SageMaker sets it.
    elsewhere = tmp_path / "mounted-valid"
    elsewhere.mkdir()
    (elsewhere / "v.bin").write_bytes(b"v")
    env["SM_CHANNEL_VALID"] = str(elsewhere)

    found = channels(environ=env)
    assert sorted(found) == ["stream", "train", "valid"]
    assert found["train"].path == train
    assert found["train"].content_type == "text/csv"
    assert [p.relative_to(train).as_posix() for p in found["train"].files()] == [
        "a.csv",
        "part/b/m.csv",
        "z.csv",
    ]
    assert found["valid"].files() == [elsewhere / "v.bin"]
    with pytest.raises(ChannelError, match='"train" is in File mode'):
        next(found["train"].epochs())
    with pytest.raises(ChannelError, match='"stream" is in Pipe mode'):
        found["stream"].files()


def test_channels_from_the_job_config_and_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    paths = config.Paths(tmp_path)
    paths.input_config_dir.mkdir(parents=True)
    paths.input_data_config_file.write_text(json.dumps({"train": {"TrainingInputMode": "File"}}))
    job = config.load(paths)
    assert channel("train", config=job).path == paths.channel_dir("train")
    # With no SM_INPUT_DATA_CONFIG, inputdataconfig.json under SMDIST_OPT_ML is read.
    monkeypatch.setenv("SMDIST_OPT_ML", str(tmp_path))
    monkeypatch.delenv("SM_INPUT_DATA_CONFIG", raising=False)
    assert list(channels()) == ["train"]


def test_bad_channel_input_gets_a_one_line_error_naming_where(tmp_path: Path) -> None:
    env = _env(tmp_path, {"train": {"TrainingInputMode": "File"}})
    with pytest.raises(
        ChannelError,
        match=r'no input channel "test" in SM_INPUT_DATA_CONFIG '
        r"\(channels: train\)",
    ):
        channel("test", environ=env)
    env["SM_INPUT_DATA_CONFIG"] = "{not json"
    with pytest.raises(ChannelError, match="SM_INPUT_DATA_CONFIG: not valid JSON"):
        channels(environ=env)
    env["SM_INPUT_DATA_CONFIG"] = json.dumps({"train": {"TrainingInputMode": "Stream"}})
    with pytest.raises(ChannelError) as err:
        channels(environ=env)
    assert str(err.value) == (
        'SM_INPUT_DATA_CONFIG: field "train.TrainingInputMode": expected File or Pipe or '
        'FastFile, got "Stream"'
    )
    missing = channels(environ=_env(tmp_path / "none", {"train": {}}))["train"]
    with pytest.raises(ChannelError, match=r"directory .* does not exist"):
        missing.files()


def test_iter_lines_handles_crlf_and_a_last_line_without_newline() -> None:
    data = b"a,1\r\nb,2\n\nlast"
    assert list(iter_lines(io.BytesIO(data), chunk_size=3)) == [b"a,1", b"b,2", b"", b"last"]


def _recordio_part(data: bytes, flag: int = 0) -> bytes:
    header = struct.pack("<II", RECORDIO_MAGIC, (flag << 29) | len(data))
    return header + data + b"\0" * (-len(data) % 4)


def test_recordio_records_are_unwrapped_and_split_records_joined() -> None:
    magic = struct.pack("<I", RECORDIO_MAGIC)
    stream = (
        _recordio_part(b"")
        + _recordio_part(b"a")
        + _recordio_part(b"abcd")
        + _recordio_part(b"abcde")
        # A record that held the magic number twice, written as three parts.
        + _recordio_part(b"head", 1)
        + _recordio_part(b"mid", 2)
        + _recordio_part(b"tail", 3)
    )
    assert list(iter_recordio(io.BytesIO(stream))) == [
        b"",
        b"a",
        b"abcd",
        b"abcde",
        b"head" + magic + b"mid" + magic + b"tail",
    ]
    with pytest.raises(ChannelError, match=r"ended inside a record \(4 of 8\)"):
        list(iter_recordio(io.BytesIO(_recordio_part(b"abcdefg")[:12])))
    with pytest.raises(ChannelError, match="bad magic 0x00000000"):
        list(iter_recordio(io.BytesIO(b"\0" * 8)))
