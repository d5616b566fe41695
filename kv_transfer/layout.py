"""What the two workers of a KV pair must agree on, checked twice so that a handoff fails closed:

- at pairing, each side puts its `KVLayout` in the pair's store and reads the other's; any difference (another
  model, KV dtype, block size, head shape, message grouping, checksums on one side only) refuses the pair on both
  sides with `PairRefused`, naming every field that differs. Such workers never pair, so routers never send a
  request between them.
- with every transfer, the header names the request's tag, its block count and the whole layout; the receiver
  checks each field (`check_header`), so a message stream that is out of step (a transport that matches by order,
  as NCCL does, after a lost message) is caught before any byte lands in a block.
- optionally (`kv_transfer.checksums`, on in tests) the sender follows the layer groups with their CRC-32s, and the
  receiver fails a transfer whose bytes differ (`Corrupted`); the request is then computed again elsewhere.

    header = layout.header(tag, blocks)  # int64 [len(HEADER_FIELDS)]
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import zlib
from dataclasses import dataclass

import torch
import torch.distributed as dist

from pdserve.engine.kv_cache import KVCache

HEADER_VERSION = 2
HEADER_FIELDS = ("version", "tag", "blocks", "layers", "block_size", "kv_heads", "head_dim", "dtype",
                 "layers_per_message", "checksums", "model")
DTYPES = ("float32", "bfloat16", "float16", "float8_e4m3fn", "float8_e5m2", "int8")
"""KV dtypes by their number in the header."""


class PairRefused(RuntimeError):
    """The peer's KV layout differs from this worker's: they must not pair."""


class HeaderMismatch(Exception):
    """A transfer's header is not the one this side expects (the pair's message stream is out of step)."""


class Corrupted(Exception):
    """A layer group's bytes arrived with another checksum than the sender computed."""


@dataclass(frozen=True)
class KVLayout:
    layers: int
    block_size: int
    kv_heads: int
    head_dim: int
    dtype: str
    layers_per_message: int
    checksums: bool
    model: str
    """The model's fingerprint (`engine.fingerprint`)."""

    @staticmethod
    def of(cache: KVCache, layers_per_message: int, checksums: bool, model: str) -> KVLayout:
        _, layers, _, block_size, kv_heads, head_dim = cache.tensor.shape  # [2, L, blocks, block_size, H_kv, D]
        return KVLayout(layers, block_size, kv_heads, head_dim, str(cache.tensor.dtype).removeprefix("torch."),
                        layers_per_message, checksums, model)

    def differences(self, peer: KVLayout) -> list[str]:
        return [f"{f.name}: {getattr(self, f.name)!r} here, {getattr(peer, f.name)!r} at the peer"
                for f in dataclasses.fields(self) if getattr(self, f.name) != getattr(peer, f.name)]

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @staticmethod
    def from_json(text: str | bytes) -> KVLayout:
        return KVLayout(**json.loads(text))

    def header(self, tag: int, blocks: int, device: torch.device | str = "cpu") -> torch.Tensor:
        values = [HEADER_VERSION, tag, blocks, self.layers, self.block_size, self.kv_heads, self.head_dim,
                  _dtype_number(self.dtype), self.layers_per_message, int(self.checksums),
                  _model_number(self.model)]
        return torch.tensor(values, dtype=torch.int64, device=device)


def agree(store: dist.Store, rank: int, mine: KVLayout, me: str, peer: str) -> None:
    """Exchange layouts with the peer through the pair's `store` (both sides call this, with opposite ranks);
    raises PairRefused naming every difference."""
    store.set(f"layout/{rank}", mine.to_json())
    theirs = KVLayout.from_json(store.get(f"layout/{1 - rank}"))
    differences = mine.differences(theirs)
    if differences:
        raise PairRefused(f"KV pair {me} <-> {peer} refused: their KV layouts differ ({'; '.join(differences)})")


def check_header(received: torch.Tensor, expected: torch.Tensor) -> None:
    """Raises HeaderMismatch naming each field of `received` that differs from `expected`."""
    got, want = received.tolist(), expected.tolist()
    wrong = [f"{name} {g} (expected {w})" for name, g, w in zip(HEADER_FIELDS, got, want) if g != w]
    if wrong:
        raise HeaderMismatch("the peer's header has " + ", ".join(wrong))


def checksum(tensor: torch.Tensor) -> int:
    """CRC-32 of the tensor's bytes (copied to the host first when it lives on a device)."""
    data = tensor.detach().contiguous()
    if data.device.type != "cpu":
        data = data.cpu()
    return zlib.crc32(data.view(torch.uint8).numpy())


def _dtype_number(name: str) -> int:
    return DTYPES.index(name) if name in DTYPES else len(DTYPES)


def _model_number(fingerprint: str) -> int:
    """The fingerprint as a number that fits the int64 header (56 bits of its hash)."""
    return int.from_bytes(hashlib.blake2b(fingerprint.encode(), digest_size=7).digest(), "big")
