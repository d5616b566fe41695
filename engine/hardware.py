"""Accelerators the cost model knows: peak compute, memory bandwidth and capacity, and link speeds, from datasheets.

This module owns the published figures only. How much of each peak real kernels reach is the cost model's business
(`engine.cost_model`), so the same `Hardware` serves a roofline with any efficiency.

Units: FLOP/s and bytes/s are decimal (as datasheets give them: 3.35 TB/s = 3.35e12 B/s). Memory capacity is binary:
HBM capacity sold as "80GB" is 80 GiB of stacks (nvidia-smi reports 81,559 MiB usable on an H100 SXM 80GB, 81,920 MiB
on an A100 80GB), so `memory_bytes` is the marketed figure in GiB.
"""

from __future__ import annotations

from dataclasses import dataclass

from pdserve.engine.config import ConfigError

GIB = 1 << 30


@dataclass(frozen=True)
class Hardware:
    """One accelerator (one GPU) as the datasheet describes it."""

    name: str
    peak_flops: float
    """Dense (no sparsity) bf16/fp16 tensor-core FLOP/s."""
    hbm_bytes_per_s: float
    """Peak memory (HBM) bandwidth, bytes/s."""
    memory_bytes: int
    """Memory capacity, bytes (binary: the marketed GB figure in GiB)."""
    nvlink_bytes_per_s: float
    """NVLink bandwidth per direction per GPU, bytes/s (the datasheet's bidirectional total / 2)."""
    network_bytes_per_s: float
    """Scale-out network bandwidth per GPU per direction, bytes/s (one NIC per GPU: 400 Gb/s = 50e9 B/s)."""

    def __post_init__(self) -> None:
        for field in ("peak_flops", "hbm_bytes_per_s", "memory_bytes", "nvlink_bytes_per_s", "network_bytes_per_s"):
            if not getattr(self, field) > 0:
                raise ValueError(f"Hardware {self.name}: {field} must be > 0, got {getattr(self, field)}")


HARDWARE: dict[str, Hardware] = {
    # NVIDIA H100 SXM5 80GB datasheet: 989 TFLOPS dense BF16 (1,979 with sparsity), 3.35 TB/s HBM3, NVLink 4 at
    # 900 GB/s bidirectional; DGX H100 pairs each GPU with a 400 Gb/s ConnectX-7 (NDR InfiniBand).
    "h100": Hardware(name="h100", peak_flops=989e12, hbm_bytes_per_s=3.35e12, memory_bytes=80 * GIB,
                     nvlink_bytes_per_s=450e9, network_bytes_per_s=50e9),
    # NVIDIA H200 SXM 141GB: the H100's compute with 4.8 TB/s HBM3e; same NVLink 4 and NIC per GPU (DGX H200).
    "h200": Hardware(name="h200", peak_flops=989e12, hbm_bytes_per_s=4.8e12, memory_bytes=141 * GIB,
                     nvlink_bytes_per_s=450e9, network_bytes_per_s=50e9),
    # NVIDIA A100 SXM4 80GB: 312 TFLOPS dense BF16, 2,039 GB/s HBM2e, NVLink 3 at 600 GB/s bidirectional; DGX A100 has
    # one 200 Gb/s HDR InfiniBand NIC per GPU.
    "a100": Hardware(name="a100", peak_flops=312e12, hbm_bytes_per_s=2.039e12, memory_bytes=80 * GIB,
                     nvlink_bytes_per_s=300e9, network_bytes_per_s=25e9),
    # NVIDIA A100 SXM4 40GB: as the 80GB part with 1,555 GB/s HBM2.
    "a100-40gb": Hardware(name="a100-40gb", peak_flops=312e12, hbm_bytes_per_s=1.555e12, memory_bytes=40 * GIB,
                          nvlink_bytes_per_s=300e9, network_bytes_per_s=25e9),
}


def hardware(name: str) -> Hardware:
    """The named accelerator, or a ConfigError naming `engine.sim.hardware` and listing the known ones."""
    if name not in HARDWARE:
        raise ConfigError(f"engine.sim.hardware: unknown hardware {name!r} (known: {', '.join(sorted(HARDWARE))})")
    return HARDWARE[name]
