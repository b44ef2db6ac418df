"""GPU catalogue: memory, dense bf16 throughput and the intra-node link, by name.

Memory is what `torch.cuda.get_device_properties().total_memory` reports (a little
under the marketing figure). Throughput is the dense (no sparsity) bf16 tensor-core
figure from the vendor's datasheet; the link is the per-GPU, one-direction bandwidth a
collective can use inside a node (NVLink where the SKU has it, PCIe otherwise).
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass

from bigft.errors import ConfigError

GIB = 1024**3
# Per-GPU share of a node's network for collectives across nodes (one 200 Gb/s NIC per
# GPU, the common HDR/NDR InfiniBand build), in GB/s.
INTER_NODE_GBPS = 25.0


@dataclass(frozen=True)
class GPU:
    """One accelerator model."""

    name: str
    memory_gib: float
    bf16_tflops: float
    link_gbps: float
    aliases: tuple[str, ...] = ()

    @property
    def memory_bytes(self) -> int:
        return int(self.memory_gib * GIB)


CATALOGUE: tuple[GPU, ...] = (
    GPU("rtx3090", 23.7, 71, 25, ("3090", "geforce rtx 3090")),
    GPU("rtx4090", 23.6, 165, 25, ("4090", "geforce rtx 4090")),
    GPU("rtx-a6000", 47.5, 155, 25, ("a6000",)),
    GPU("rtx6000-ada", 47.5, 364, 25, ("6000ada", "rtx 6000 ada")),
    GPU("a10g", 22.1, 70, 16, ()),
    GPU("a10", 22.1, 125, 25, ()),
    GPU("l4", 22.0, 121, 25, ()),
    GPU("l40s", 44.4, 362, 25, ("l40",)),
    GPU("v100-32", 31.7, 125, 150, ("v100",)),  # fp16: V100 has no bf16
    GPU("a100-40", 39.4, 312, 300, ("a100-40gb", "a100 40gb")),
    GPU("a100-80", 79.2, 312, 300, ("a100", "a100-80gb", "a100 80gb")),
    GPU("h100-80", 79.1, 989, 450, ("h100", "h100-sxm", "h100-80gb", "h100 sxm")),
    GPU("h100-pcie", 79.1, 756, 64, ("h100 pcie",)),
    GPU("h100-nvl", 93.1, 835, 300, ("h100nvl",)),
    GPU("h200", 139.8, 989, 450, ("h200-141", "h200 sxm")),
    GPU("gh200", 94.5, 989, 450, ()),
    GPU("b200", 178.4, 2250, 900, ()),
    GPU("mi300x", 191.5, 1307, 448, ()),
)


def _key(name: str) -> str:
    """'NVIDIA GeForce RTX 4090' -> 'rtx4090'; 'H100 80GB HBM3' -> 'h10080'."""
    text = name.lower().replace("nvidia", "").replace("geforce", "").replace("hbm3", "")
    return re.sub(r"[^a-z0-9]", "", text.replace("gb", ""))


def _index() -> dict[str, GPU]:
    table: dict[str, GPU] = {}
    for gpu in CATALOGUE:
        for alias in (gpu.name, *gpu.aliases):
            table[_key(alias)] = gpu
    return table


def get_gpu(name: str) -> GPU:
    """The catalogue entry for `name` (case, spaces and dashes ignored).

    Raises ConfigError naming the nearest entries when the name is unknown.
    """
    table = _index()
    gpu = table.get(_key(name))
    if gpu is not None:
        return gpu
    names = [g.name for g in CATALOGUE]
    close = difflib.get_close_matches(name.lower(), names, n=3, cutoff=0.3)
    hint = f"; nearest: {', '.join(close)}" if close else ""
    raise ConfigError(
        f"unknown GPU '{name}'{hint}; known: {', '.join(names)} (or pass --gpu-mem GIB)"
    )


def custom_gpu(memory_gib: float) -> GPU:
    """A GPU known only by its memory; throughput and link of an A100 for the ranking."""
    if memory_gib <= 0:
        raise ConfigError(f"--gpu-mem must be positive (got {memory_gib:g})")
    return GPU(f"{memory_gib:g} GiB GPU", memory_gib, 312, 300)


def collective_gbps(gpu: GPU, nodes: int) -> float:
    """Bandwidth a ring collective runs at: the intra-node link, or the network per GPU."""
    return gpu.link_gbps if nodes <= 1 else min(gpu.link_gbps, INTER_NODE_GBPS)
