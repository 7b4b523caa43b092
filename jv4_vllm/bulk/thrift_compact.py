"""A generic reader and writer of Thrift's compact protocol, for Parquet footers.

Parquet's footer (``FileMetaData``) is compact-protocol Thrift. pyarrow writes every file
from offset 0 and cannot append, so :mod:`jv4_vllm.bulk.parquet_out` appends a row group
by moving its byte offsets and merging footers; this module only turns the bytes into a
tree of ``Field`` values and back, losslessly (unknown fields kept as they are).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["Field", "Struct", "decode_struct", "encode_struct"]

STOP, TRUE, FALSE, BYTE, I16, I32, I64, DOUBLE, BINARY, LIST, SET, MAP, STRUCT = range(13)


@dataclass
class Field:
    """One struct field: id, compact type and value (lists hold (element type, [values]))."""

    id: int
    type: int
    value: Any


Struct = list[Field]


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def byte(self) -> int:
        value = self.data[self.pos]
        self.pos += 1
        return value

    def varint(self) -> int:
        shift = result = 0
        while True:
            b = self.byte()
            result |= (b & 0x7F) << shift
            if not b & 0x80:
                return result
            shift += 7

    def zigzag(self) -> int:
        n = self.varint()
        return (n >> 1) ^ -(n & 1)

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise ValueError("truncated thrift data")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def value(self, kind: int) -> Any:
        if kind in (TRUE, FALSE):
            return kind == TRUE
        if kind == BYTE:
            return self.byte()
        if kind in (I16, I32, I64):
            return self.zigzag()
        if kind == DOUBLE:
            return self.take(8)
        if kind == BINARY:
            return self.take(self.varint())
        if kind in (LIST, SET):
            head = self.byte()
            size, element = head >> 4, head & 0x0F
            if size == 15:
                size = self.varint()
            if element in (TRUE, FALSE):  # list elements: one byte each
                return element, [self.byte() == TRUE for _ in range(size)]
            return element, [self.value(element) for _ in range(size)]
        if kind == MAP:
            size = self.varint()
            if not size:
                return (0, 0), []
            types = self.byte()
            key, val = types >> 4, types & 0x0F
            return (key, val), [(self.value(key), self.value(val)) for _ in range(size)]
        if kind == STRUCT:
            return self.struct()
        raise ValueError(f"unknown thrift compact type {kind}")

    def struct(self) -> Struct:
        fields: Struct = []
        last = 0
        while True:
            head = self.byte()
            kind = head & 0x0F
            if kind == STOP:
                return fields
            delta = head >> 4
            last = last + delta if delta else self.zigzag()
            fields.append(Field(last, kind, self.value(kind)))


class _Writer:
    def __init__(self) -> None:
        self.out = bytearray()

    def varint(self, n: int) -> None:
        while n > 0x7F:
            self.out.append((n & 0x7F) | 0x80)
            n >>= 7
        self.out.append(n)

    def zigzag(self, n: int) -> None:
        self.varint((n << 1) ^ (n >> 63))

    def value(self, kind: int, value: Any) -> None:
        if kind in (TRUE, FALSE):
            return
        if kind == BYTE:
            self.out.append(value & 0xFF)
        elif kind in (I16, I32, I64):
            self.zigzag(value)
        elif kind == DOUBLE:
            self.out += value
        elif kind == BINARY:
            self.varint(len(value))
            self.out += value
        elif kind in (LIST, SET):
            element, items = value
            if len(items) < 15:
                self.out.append(len(items) << 4 | element)
            else:
                self.out.append(0xF0 | element)
                self.varint(len(items))
            for item in items:
                if element in (TRUE, FALSE):
                    self.out.append(TRUE if item else FALSE)
                else:
                    self.value(element, item)
        elif kind == MAP:
            (key, val), items = value
            self.varint(len(items))
            if items:
                self.out.append(key << 4 | val)
                for k, v in items:
                    self.value(key, k)
                    self.value(val, v)
        elif kind == STRUCT:
            self.struct(value)
        else:
            raise ValueError(f"unknown thrift compact type {kind}")

    def struct(self, fields: Struct) -> None:
        last = 0
        for field in fields:
            kind = field.type
            if kind in (TRUE, FALSE):
                kind = TRUE if field.value else FALSE
            delta = field.id - last
            if 0 < delta <= 15:
                self.out.append(delta << 4 | kind)
            else:
                self.out.append(kind)
                self.zigzag(field.id)
            self.value(kind, field.value)
            last = field.id
        self.out.append(STOP)


def decode_struct(data: bytes) -> Struct:
    """One struct from the start of ``data`` (ValueError when it is cut short or malformed)."""
    try:
        return _Reader(data).struct()
    except IndexError:
        raise ValueError("truncated thrift data") from None


def encode_struct(fields: Struct) -> bytes:
    writer = _Writer()
    writer.struct(fields)
    return bytes(writer.out)
