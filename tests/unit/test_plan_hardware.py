"""GPU catalogue lookups."""

from __future__ import annotations

import pytest

from bigft.errors import ConfigError
from bigft.plan.hardware import CATALOGUE, collective_gbps, custom_gpu, get_gpu


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("RTX 4090", "rtx4090"),
        ("NVIDIA GeForce RTX 3090", "rtx3090"),
        ("a100", "a100-80"),
        ("A100-40GB", "a100-40"),
        ("NVIDIA H100 80GB HBM3", "h100-80"),
        ("h100", "h100-80"),
        ("H200", "h200"),
        ("L40S", "l40s"),
        ("a10g", "a10g"),
    ],
)
def test_names_as_people_and_drivers_write_them(name: str, expected: str) -> None:
    assert get_gpu(name).name == expected


def test_catalogue_entries_are_plausible() -> None:
    for gpu in CATALOGUE:
        assert 16 < gpu.memory_gib < 200 and 50 < gpu.bf16_tflops < 3000 and gpu.link_gbps > 0
    assert get_gpu("h100").bf16_tflops > get_gpu("a100").bf16_tflops > get_gpu("l4").bf16_tflops


def test_unknown_gpu_names_the_nearest_ones() -> None:
    with pytest.raises(ConfigError, match=r"unknown GPU 'h1000'; nearest: h100.*--gpu-mem"):
        get_gpu("h1000")


def test_memory_only_gpus_and_network_bandwidth() -> None:
    assert custom_gpu(24).memory_bytes == 24 * 1024**3
    with pytest.raises(ConfigError, match="--gpu-mem must be positive"):
        custom_gpu(0)
    h100 = get_gpu("h100")
    assert collective_gbps(h100, nodes=1) > collective_gbps(h100, nodes=2)
