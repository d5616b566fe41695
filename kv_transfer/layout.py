"""What the two workers of a KV pair must agree on, checked twice so that a handoff fails closed:

- at pairing, each side puts its `KVLayout` in the pair's store and reads the other's; any difference (another
  model, KV dtype, block size, head shape, checksums on one side only) refuses the pair on both
  sides with `PairRefused`, naming every field that differs. Such workers never pair, so routers never send a
  request between them.
- with every transfer, the header names the request's tag, its block count, its piece count and the whole layout;
  the receiver checks every layout field (`check_header`), so a message stream that is out of step (a bug, or a
  message lost on a transport that matches by order, as NCCL does) is caught before any byte lands in a block.
- optionally (`kv_transfer.checksums`, on in tests) the sender follows the layers with their CRC-32s, and the
  receiver fails a transfer whose bytes differ (`Corrupted`); the request is then computed again elsewhere.

    header = layout.header(tag, blocks, pieces)  # int64 [len(HEADER_FIELDS)]
    tag, blocks, pieces = check_header(header, layout)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass

import torch
import torch.distributed as dist

from pdserve.engine.kv_cache import KVCache

HEADER_VERSION = 3
HEADER_FIELDS = ("version", "tag", "blocks", "pieces", "layers", "block_size", "kv_heads", "head_dim", "dtype",
                 "checksums", "model")
TRANSFER_FIELDS = ("tag", "blocks", "pieces")
"""The fields that differ from one transfer to the next; the others must equal the receiver's own."""
DTYPES = ("float32", "bfloat16", "float16", "float8_e4m3fn", "float8_e5m2", "int8")
"""KV dtypes by their number in the header."""


class PairRefused(RuntimeError):
    """The peer's KV layout differs from this worker's: they must not pair."""


class HeaderMismatch(Exception):
    """A transfer's header is not the one this side expects (the pair's message stream is out of step)."""


class Corrupted(Exception):
    """A layer's bytes arrived with another checksum than the sender computed."""


@dataclass(frozen=True)
class KVLayout:
    layers: int
    block_size: int
    kv_heads: int
    head_dim: int
    dtype: str
    checksums: bool
    model: str
    """The model's fingerprint (`engine.fingerprint`)."""

    @staticmethod
    def of(cache: KVCache, checksums: bool, model: str) -> KVLayout:
        _, layers, _, block_size, kv_heads, head_dim = cache.tensor.shape  # [2, L, blocks, block_size, H_kv, D]
        return KVLayout(layers, block_size, kv_heads, head_dim, str(cache.tensor.dtype).removeprefix("torch."),
                        checksums, model)

    def differences(self, peer: KVLayout) -> list[str]:
        return [f"{f.name}: {getattr(self, f.name)!r} here, {getattr(peer, f.name)!r} at the peer"
                for f in dataclasses.fields(self) if getattr(self, f.name) != getattr(peer, f.name)]

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @staticmethod
    def from_json(text: str | bytes) -> KVLayout:
        return KVLayout(**json.loads(text))

    def header(self, tag: int, blocks: int, pieces: int, device: torch.device | str = "cpu") -> torch.Tensor:
        values = [HEADER_VERSION, tag, blocks, pieces, self.layers, self.block_size, self.kv_heads, self.head_dim,
                  _dtype_number(self.dtype), int(self.checksums), _model_number(self.model)]
        return torch.tensor(values, dtype=torch.int64, device=device)


def agree(store: dist.Store, rank: int, mine: KVLayout, me: str, peer: str) -> None:
    """Exchange layouts with the peer through the pair's `store` (both sides call this, with opposite ranks);
    raises PairRefused naming every difference."""
    store.set(f"layout/{rank}", mine.to_json())
    theirs = KVLayout.from_json(store.get(f"layout/{1 - rank}"))
    differences = mine.differences(theirs)
    if differences:
        raise PairRefused(f"KV pair {me} <-> {peer} refused: their KV layouts differ ({'; '.join(differences)})")


def check_header(received: torch.Tensor, layout: KVLayout) -> tuple[int, int, int]:
    """The transfer's (tag, blocks, pieces); raises HeaderMismatch naming each layout field of `received` that
    differs from `layout`."""
    got = dict(zip(HEADER_FIELDS, received.tolist()))
    want = dict(zip(HEADER_FIELDS, layout.header(0, 0, 0).tolist()))
    wrong = [f"{name} {got[name]} (expected {want[name]})" for name in HEADER_FIELDS
             if name not in TRANSFER_FIELDS and got[name] != want[name]]
    if wrong:
        raise HeaderMismatch("the peer's header has " + ", ".join(wrong))
    return got["tag"], got["blocks"], got["pieces"]


def _dtype_number(name: str) -> int:
    return DTYPES.index(name) if name in DTYPES else len(DTYPES)


def _model_number(fingerprint: str) -> int:
    """The fingerprint as a number that fits the int64 header (56 bits of its hash)."""
    return int.from_bytes(hashlib.blake2b(fingerprint.encode(), digest_size=7).digest(), "big")
