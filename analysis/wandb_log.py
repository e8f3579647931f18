"""Read a W&B offline run file (``run-*.wandb``) back, without a server or network.

The file is a LevelDB-style log: a 7-byte header (``:W&B``, magic 0xBEE1, version), then
32 KiB blocks of records, each a 7-byte header (checksum, length, kind) and a slice of a
serialized ``wandb_internal_pb2.Record``; a record longer than a block's remainder is split
into FIRST/MIDDLE/LAST pieces. Checksums are not verified.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

FILE_HEADER = struct.Struct("<4sHB")
RECORD_HEADER = struct.Struct("<IHB")
BLOCK = 32768
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_records(path: str | Path) -> list:
    """Every record of the run file, as ``wandb_internal_pb2.Record`` messages, in order."""
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    ident, magic, _version = FILE_HEADER.unpack_from(data, 0)
    if ident != b":W&B" or magic != 0xBEE1:
        raise ValueError(f"{path} is not a W&B run file")
    payloads, pending, pos = [], b"", FILE_HEADER.size
    while pos + RECORD_HEADER.size <= len(data):
        left_in_block = BLOCK - pos % BLOCK
        if left_in_block < RECORD_HEADER.size:  # block trailer padding
            pos += left_in_block
            continue
        _checksum, length, kind = RECORD_HEADER.unpack_from(data, pos)
        chunk = data[pos + RECORD_HEADER.size: pos + RECORD_HEADER.size + length]
        pos += RECORD_HEADER.size + length
        if kind == FULL:
            payloads.append(chunk)
        elif kind == FIRST:
            pending = chunk
        elif kind == MIDDLE:
            pending += chunk
        elif kind == LAST:
            payloads.append(pending + chunk)
    records = []
    for payload in payloads:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        records.append(record)
    return records


def _items(items) -> dict:
    return {"/".join(item.nested_key) or item.key: json.loads(item.value_json) for item in items}


def history(path: str | Path) -> list[dict]:
    """The rows the run logged with ``run.log``, in order."""
    return [_items(r.history.item) for r in read_records(path) if r.WhichOneof("record_type") == "history"]


def summary(path: str | Path) -> dict:
    """The run's final summary (later updates win)."""
    merged = {}
    for r in read_records(path):
        if r.WhichOneof("record_type") == "summary":
            merged.update(_items(r.summary.update))
    return merged
