"""Read an offline wandb run back for the tests.

wandb 0.31 ships no public Python reader for its ``run-<id>.wandb`` transaction log (the old
``wandb.sdk.internal.datastore`` is gone; ``wandb.beta.LocalApi`` is not released). The file is a
LevelDB-format log of ``wandb.proto.wandb_internal_pb2.Record`` messages: this module undoes the
framing (as ``datastore.py`` did) and decodes every record with wandb's own protobuf schema.
"""

from __future__ import annotations

import glob
import json
import os
import struct
from dataclasses import dataclass, field

from wandb.proto import wandb_internal_pb2

BLOCK = 32768
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_records(path: str) -> list[wandb_internal_pb2.Record]:
    """Every record of a ``.wandb`` file, in order."""
    with open(path, "rb") as f:
        raw = f.read()
    ident, _magic, _version = struct.unpack("<4sHB", raw[:HEADER])
    if ident != b":W&B":
        raise ValueError(f"{path}: not a wandb transaction log")
    records, pos, pending = [], HEADER, b""
    while pos + HEADER <= len(raw):
        if BLOCK - pos % BLOCK < HEADER:  # block trailer padding
            pos += BLOCK - pos % BLOCK
            continue
        _crc, length, kind = struct.unpack("<IHB", raw[pos : pos + HEADER])
        data = raw[pos + HEADER : pos + HEADER + length]
        pos += HEADER + length
        if kind == FULL:
            pending = data
        elif kind == FIRST:
            pending = data
            continue
        elif kind == MIDDLE:
            pending += data
            continue
        elif kind == LAST:
            pending += data
        else:  # zero padding at the end of a file still being written
            break
        record = wandb_internal_pb2.Record()
        record.ParseFromString(pending)
        records.append(record)
    return records


@dataclass
class OfflineRun:
    """What the tests check: history rows, config, the run's name and group."""

    history: list[dict] = field(default_factory=list)
    config: dict = field(default_factory=dict)
    name: str = ""
    group: str = ""
    exit_code: int | None = None

    @property
    def history_keys(self) -> set[str]:
        return {k for row in self.history for k in row}


def _key(item) -> str:
    return "/".join(item.nested_key) if item.nested_key else item.key


def read_run(output_dir: str) -> OfflineRun:
    """The (single) offline wandb run under ``output_dir``."""
    # latest-run is a symlink to the run's folder: count each file once.
    files = sorted({os.path.realpath(p) for p in glob.glob(os.path.join(output_dir, "**", "run-*.wandb"), recursive=True)})
    if len(files) != 1:
        raise AssertionError(f"expected one .wandb file under {output_dir}, found {files}")
    run = OfflineRun()
    for record in read_records(files[0]):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            run.history.append({_key(item): json.loads(item.value_json) for item in record.history.item})
        elif kind == "config":
            for item in record.config.update:
                run.config[_key(item)] = json.loads(item.value_json)
        elif kind == "run":
            run.name, run.group = record.run.display_name, record.run.run_group
            for item in record.run.config.update:
                run.config[_key(item)] = json.loads(item.value_json)
        elif kind == "exit":
            run.exit_code = record.exit.exit_code
    return run
