"""A Parquet file that grows one row group at a time and survives being killed at any moment.

pyarrow only writes whole files from offset 0, so each row group is written alone into
memory, its bytes are appended where the file's data ends (over the old footer), and the
footer is rewritten with every row group so far, their offsets moved to where they now lie
(:mod:`jv4_vllm.bulk.thrift_compact`). The file is a valid Parquet file after every
append. While one is being written, ``<file>.footer`` holds the previous end of the data
and the previous footer, so a file cut short by a kill is repaired by truncating it there
and putting that footer back: the row groups written before stay, nothing is duplicated.
"""

from __future__ import annotations

import io
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from jv4_vllm.bulk.thrift_compact import (
    I16,
    I64,
    LIST,
    STRUCT,
    Field,
    Struct,
    decode_struct,
    encode_struct,
)

__all__ = ["ParquetAppender", "repair_parquet"]

MAGIC = b"PAR1"
# Parquet field ids (parquet.thrift) of the offsets that move with a row group.
FILE_NUM_ROWS, FILE_ROW_GROUPS = 3, 4
GROUP_COLUMNS, GROUP_NUM_ROWS, GROUP_FILE_OFFSET, GROUP_ORDINAL = 1, 3, 5, 7
CHUNK_OFFSETS = (2, 4, 6)  # file_offset, offset_index_offset, column_index_offset
CHUNK_META = 3
META_OFFSETS = (9, 10, 11, 14)  # data, index, dictionary page offsets; bloom filter offset


def _footer_of(data: bytes) -> tuple[int, bytes]:
    """(end of the row-group data, footer bytes) of a complete Parquet file in ``data``."""
    if len(data) < 12 or data[-4:] != MAGIC or data[:4] != MAGIC:
        raise ValueError("not a complete Parquet file")
    (length,) = struct.unpack("<i", data[-8:-4])
    if not 0 < length <= len(data) - 12:
        raise ValueError("bad Parquet footer length")
    return len(data) - 8 - length, data[-8 - length:-8]


def _field(fields: Struct, field_id: int) -> Field | None:
    return next((f for f in fields if f.id == field_id), None)


def _shift(group: Struct, delta: int, ordinal: int) -> Struct:
    """A row group's metadata with every absolute offset moved by ``delta``."""
    for field in group:
        if field.id == GROUP_FILE_OFFSET:
            field.value += delta
        elif field.id == GROUP_COLUMNS:
            for chunk in field.value[1]:
                for part in chunk:
                    if part.id in CHUNK_OFFSETS and part.type == I64:
                        part.value += delta
                    elif part.id == CHUNK_META:
                        for meta in part.value:
                            if meta.id in META_OFFSETS and meta.type == I64:
                                meta.value += delta
    ordinal_field = _field(group, GROUP_ORDINAL)
    if ordinal_field is not None:
        ordinal_field.value = ordinal
    else:
        group.append(Field(GROUP_ORDINAL, I16, ordinal))
        group.sort(key=lambda f: f.id)
    return group


def _tail(path: Path, max_footer: int = 64 << 20) -> bytes:
    """The file's first 4 bytes and its footer region, without reading the data between."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(4)
        if size < 12:
            return head
        fh.seek(size - 8)
        (length,) = struct.unpack("<i", fh.read(4))
        if not 0 < length <= min(size - 12, max_footer):
            raise ValueError(f"{path}: bad Parquet footer length")
        fh.seek(size - 8 - length)
        return head + fh.read(length + 8)


def _read_footer(path: Path) -> tuple[int, bytes]:
    """(data end, footer) of a complete file; ValueError when the file is cut short."""
    tail = _tail(path)
    if tail[:4] != MAGIC or tail[-4:] != MAGIC:
        raise ValueError(f"{path}: not a complete Parquet file")
    footer = tail[4:-8]
    decode_struct(footer)  # a footer cut or overwritten does not decode
    pq.read_metadata(path)  # and pyarrow agrees
    return path.stat().st_size - 8 - len(footer), footer


def repair_parquet(path: Path) -> bool:
    """Make ``path`` a complete file again after a kill; True when something was repaired."""
    sidecar = _sidecar(path)
    try:
        _read_footer(path)
    except (ValueError, OSError, pa.ArrowException):
        if not sidecar.is_file():
            raise ValueError(f"{path} is not a complete Parquet file and has no {sidecar.name} to repair "
                             "it from; remove it or choose another output") from None
        raw = sidecar.read_bytes()
        (end,) = struct.unpack("<q", raw[:8])
        footer = raw[8:]
        with open(path, "r+b") as fh:
            fh.truncate(end)
            fh.seek(end)
            fh.write(footer + struct.pack("<i", len(footer)) + MAGIC)
        _read_footer(path)
        sidecar.unlink()
        return True
    sidecar.unlink(missing_ok=True)
    return False


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".footer")


class ParquetAppender:
    """Appends row groups to ``path`` (created with ``schema`` when missing, else repaired)."""

    def __init__(self, path: str | Path, schema: pa.Schema, *, compression: str | dict[str, str] = "none") -> None:
        self.path = Path(path)
        self.schema = schema
        self._compression = compression
        if not self.path.exists():
            self._write_new(pa.Table.from_batches([], schema=schema))
        repair_parquet(self.path)
        existing = pq.read_schema(self.path)
        if not existing.remove_metadata().equals(schema.remove_metadata()):
            raise ValueError(f"{self.path} holds columns {existing.names} of other types than this job writes "
                             f"({schema.names}); choose another output")
        self._end, footer = _read_footer(self.path)
        self._footer = decode_struct(footer)
        self._saved_end = -1

    def _write_new(self, table: pa.Table) -> None:
        buffer = io.BytesIO()
        pq.write_table(table, buffer, compression=self._compression)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_bytes(buffer.getvalue())
        os.replace(tmp, self.path)

    def _standalone(self, table: pa.Table) -> tuple[bytes, Struct]:
        buffer = io.BytesIO()
        pq.write_table(table, buffer, compression=self._compression, row_group_size=max(table.num_rows, 1))
        end, footer = _footer_of(buffer.getvalue())
        return buffer.getvalue()[4:end], decode_struct(footer)

    def append(self, table: pa.Table) -> None:
        """Write ``table`` as one row group; the file is complete again when this returns."""
        if table.num_rows == 0:
            return
        data, footer = self._standalone(table.cast(self.schema))
        groups = self._footer_groups()
        base = len(groups[1])
        for offset, group in enumerate(_field(footer, FILE_ROW_GROUPS).value[1]):  # type: ignore[union-attr]
            groups[1].append(_shift(group, self._end - 4, base + offset))
        _field(self._footer, FILE_NUM_ROWS).value += table.num_rows  # type: ignore[union-attr]
        encoded = encode_struct(self._footer)
        self._save_previous()
        with open(self.path, "r+b") as fh:
            fh.seek(self._end)
            fh.write(data + encoded + struct.pack("<i", len(encoded)) + MAGIC)
            fh.truncate()
        self._end += len(data)
        self._previous = encoded

    def _footer_groups(self) -> tuple[int, list[Struct]]:
        field = _field(self._footer, FILE_ROW_GROUPS)
        if field is None:  # an empty file may omit the list
            field = Field(FILE_ROW_GROUPS, LIST, (STRUCT, []))
            self._footer.append(field)
            self._footer.sort(key=lambda f: f.id)
        return field.value

    def _save_previous(self) -> None:
        """The footer on disk and where the data ends, kept aside while it is overwritten."""
        if self._saved_end == self._end:
            return
        previous = getattr(self, "_previous", None)
        if previous is None:
            previous = _read_footer(self.path)[1]
        tmp = _sidecar(self.path).with_suffix(".tmp")
        tmp.write_bytes(struct.pack("<q", self._end) + previous)
        os.replace(tmp, _sidecar(self.path))
        self._saved_end = self._end

    def close(self) -> None:
        """The file is complete after every append; this only drops the repair copy."""
        _sidecar(self.path).unlink(missing_ok=True)

    def rows(self, columns: list[str]) -> Iterator[pa.RecordBatch]:
        """The file's rows so far, a batch at a time (for the keys already done)."""
        yield from pq.ParquetFile(self.path).iter_batches(columns=columns, batch_size=65536)
