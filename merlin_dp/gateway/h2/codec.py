"""Header blocks: HPACK decoding behind a cache, and stateless literal encoding.

Decoding is the costly part of a proxied call (Huffman strings in ``hpack``), and a
client sends the same block again and again once its dynamic table holds the fields.
A decoded block is cached under its exact bytes while the decoder's dynamic table is
unchanged: a block that only references the table (or uses literals without indexing)
decodes to the same fields every time. A block that changes the table is never cached
(replaying it from the cache would skip the change) and clears the cache, since its
entries may now decode differently.

We encode toward peers as literals without indexing and without Huffman: no dynamic
table on our side means no state to keep in step, nothing to corrupt, and no table-size
negotiation; the bytes of a re-encoded block are cached beside the decoded fields.
"""

from __future__ import annotations

from typing import Any

import hpack
from hpack.exceptions import HPACKError, OversizedHeaderListError

Headers = list[tuple[bytes, bytes]]

CACHE_ENTRIES = 512


class HeaderBlockError(Exception):
    """A header block we cannot decode (COMPRESSION_ERROR) or one over the size limit."""

    def __init__(self, message: str, oversized: bool = False) -> None:
        super().__init__(message)
        self.oversized = oversized


class Block:
    """One decoded header block: the fields, their literal re-encoding, and a slot the
    call layer fills with what it derives from them (route keys, deadline)."""

    __slots__ = ("derived", "headers", "literal")

    def __init__(self, headers: Headers) -> None:
        self.headers = headers
        self.literal: bytes | None = None
        self.derived: Any = None

    def encoded(self) -> bytes:
        literal = self.literal
        if literal is None:
            literal = self.literal = encode(self.headers)
        return literal


class HeaderDecoder:
    __slots__ = ("_cache", "_decoder")

    def __init__(self, max_header_list_size: int) -> None:
        self._decoder = hpack.Decoder()
        self._decoder.max_header_list_size = max_header_list_size
        self._cache: dict[bytes, Block] = {}

    def decode(self, data: bytes) -> Block:
        block = self._cache.get(data)
        if block is not None:
            return block
        table = self._decoder.header_table
        # Any: the table's newest entry is compared by identity, and compiled code would
        # rebuild a typed tuple on the way out (a new object every time).
        entries: Any = table.dynamic_entries
        before = (len(entries), entries[0] if entries else None, table.maxsize)
        try:
            fields = self._decoder.decode(data, raw=True)
        except OversizedHeaderListError as exc:
            raise HeaderBlockError(str(exc), oversized=True) from None
        except (HPACKError, ValueError, IndexError) as exc:
            raise HeaderBlockError(f"undecodable header block: {exc}") from None
        block = Block([(bytes(n), bytes(v)) for n, v in fields])
        entries = table.dynamic_entries
        after = (len(entries), entries[0] if entries else None, table.maxsize)
        if after[0] != before[0] or after[1] is not before[1] or after[2] != before[2]:
            self._cache.clear()
        else:
            if len(self._cache) >= CACHE_ENTRIES:
                self._cache.clear()
            self._cache[data] = block
        return block


def _integer(value: int, prefix_bits: int, first: int) -> bytes:
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes((first | value,))
    out = bytearray((first | limit,))
    value -= limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def encode_field(name: bytes, value: bytes) -> bytes:
    """A literal header field without indexing, new name, no Huffman (RFC 7541 §6.2.2)."""
    return b"\x00" + _integer(len(name), 7, 0) + name + _integer(len(value), 7, 0) + value


def encode(headers: Headers) -> bytes:
    return b"".join(encode_field(n, v) for n, v in headers)
