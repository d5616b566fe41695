"""The messages of one KV transfer, in the order both sides of a pair post them.

A pair is one ordered channel per direction: a transfer's messages follow each other, and one transfer follows
another, so a transport that matches messages by order and ignores tags (NCCL) pairs every send with the right
receive. The receiver learns which transfer comes next from its header, never from a tag.

    header      int64 [len(HEADER_FIELDS)]   the transfer's tag, block count, piece count and the whole layout
    lengths     int64 [pieces]               blocks per piece (absent when the header says 0 blocks: "no KV")
    for each layer, for K then V, for each piece:
                [piece blocks, block_size, kv_heads, head_dim]
    checksums   int64 [layers]               with `checksums` on: each layer's CRC-32 over its messages

A piece is a run of the transfer's blocks with consecutive ids on the sender, so each message is a view of the
sender's cache (`cache[kv, layer, first:first + length]` is contiguous): no gather copy. A transfer whose blocks are
scattered into more than `MAX_DIRECT_PIECES` runs is gathered into one piece instead (fewer, larger messages). The
receiver writes a piece straight into its cache where its own blocks for that piece are consecutive too, and
through a staging tensor where they are not. Layer-major order lets a sender stream layers as they are computed.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

MAX_DIRECT_PIECES = 4
"""More runs than this and the sender gathers the blocks into one piece (a message per run would be small)."""


@dataclass(frozen=True)
class Piece:
    """The transfer's blocks `block_ids[position:position + length]`."""

    position: int
    length: int


def runs(block_ids: Sequence[int]) -> list[Piece]:
    """The maximal runs of consecutive block ids, in order."""
    pieces: list[Piece] = []
    start = 0
    for i in range(1, len(block_ids) + 1):
        if i == len(block_ids) or block_ids[i] != block_ids[i - 1] + 1:
            pieces.append(Piece(start, i - start))
            start = i
    return pieces if block_ids else []


def sender_pieces(block_ids: Sequence[int]) -> tuple[list[Piece], bool]:
    """The pieces a sender cuts its blocks into, and whether it must gather them (too many runs)."""
    pieces = runs(block_ids)
    if len(pieces) <= MAX_DIRECT_PIECES:
        return pieces, False
    return [Piece(0, len(block_ids))], True


def pieces_of(lengths: Sequence[int]) -> list[Piece]:
    """The pieces a receiver reads from the lengths message."""
    pieces, position = [], 0
    for length in lengths:
        pieces.append(Piece(position, length))
        position += length
    return pieces


def is_run(block_ids: Sequence[int]) -> bool:
    return all(b == a + 1 for a, b in zip(block_ids, block_ids[1:]))


def layer_messages(layers: int, pieces: Sequence[Piece]) -> Iterator[tuple[int, int, Piece]]:
    """(layer, kv, piece) of every data message, in wire order."""
    for layer in range(layers):
        for kv in (0, 1):
            for piece in pieces:
                yield layer, kv, piece


def crc(tensor: torch.Tensor, running: int = 0) -> int:
    """CRC-32 of the tensor's bytes, continuing `running` (copied to the host first when it lives on a device)."""
    data = tensor.detach().contiguous()
    if data.device.type != "cpu":
        data = data.cpu()
    return zlib.crc32(data.view(torch.uint8).numpy(), running)
