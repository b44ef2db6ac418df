"""Workarounds for upstream quirks, each with its symptom, a version guard and a test.

No other bigft module patches a library; when an upstream release fixes a quirk, its
shim here is deleted together with its test.
"""

from __future__ import annotations

import logging
import os
import re
import warnings
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from typing import Any

log = logging.getLogger(__name__)

# bitsandbytes releases whose Linear4bit repacks its weights for a CPU inference kernel
# (the repack arrived in 0.48); the upper bound is the newest release checked.
_BNB_REPACK_RANGE = ((0, 48), (0, 50))


def _version_tuple(package: str) -> tuple[int, ...] | None:
    try:
        text = version(package)
    except PackageNotFoundError:
        return None
    parts = []
    for piece in text.split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def disable_bnb_cpu_repack(model: Any) -> int:
    """Stop bitsandbytes' `Linear4bit` from repacking its weights for CPU inference.

    Upstream symptom (bitsandbytes 0.48–0.50, CPUs with AVX512-BF16): a forward pass in
    eval mode under `torch.no_grad()` — any evaluation during training — makes each
    `Linear4bit` convert `weight.data` in place to a packed layout for a faster CPU
    inference kernel, and never converts it back. Afterwards training gradients are
    silently wrong (torch warns that `gemv_4bit` has no autograd kernel),
    `dequantize_4bit` and merging give garbage, and layers whose out-features are not a
    multiple of 32 crash with `N must be divisible by block_n`.

    Clearing each layer's `support_avx512bf16_for_cpu` flag keeps the training layout;
    eval then runs the ordinary (slower, correct) kernel. Returns the layers changed.
    Outside the checked version range it still applies where the flag exists, with a
    warning so the shim is re-checked and removed once upstream is fixed.
    """
    try:
        from bitsandbytes.nn import Linear4bit
    except ImportError:
        return 0
    layers = [
        m
        for m in model.modules()
        if isinstance(m, Linear4bit) and getattr(m, "support_avx512bf16_for_cpu", False)
    ]
    if not layers:
        return 0
    found = _version_tuple("bitsandbytes")
    low, high = _BNB_REPACK_RANGE
    if found is not None and not (low <= found <= high):
        log.warning(
            "bitsandbytes %s is outside the range checked for the CPU repack quirk (%s-%s); "
            "re-check bigft._compat.disable_bnb_cpu_repack",
            ".".join(map(str, found)),
            ".".join(map(str, low)),
            ".".join(map(str, high)),
        )
    for layer in layers:
        layer.support_avx512bf16_for_cpu = False
    return len(layers)


def click_exceptions() -> Any:
    """The exception classes typer's command line raises (UsageError, BadParameter, ...).

    Upstream change: recent typer releases ship their own copy of click as `typer._click`
    and raise its exceptions, which are not `click.UsageError`; older releases use the
    `click` package. Whichever typer imports is the one whose exceptions reach bigft.
    """
    try:
        from typer._click import exceptions
    except ImportError:  # typer that still depends on click
        from click import exceptions  # type: ignore[no-redef]
    return exceptions


def stateful_dataloader(dataset: Any, **kwargs: Any) -> Any:
    """torchdata's `StatefulDataLoader(dataset, **kwargs)`, without its deprecation noise.

    Upstream symptom (torchdata 0.11 with torch 2.10 and newer): every loader built calls
    the deprecated `torch.set_vital`, which warns "'set_vital' is deprecated, please do
    not call" once per training run and once per evaluation. The call does nothing else.
    """
    from torchdata.stateful_dataloader import StatefulDataLoader

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="'set_vital' is deprecated")
        return StatefulDataLoader(dataset, **kwargs)


class _DropMessages(logging.Filter):
    """Drops a logger's records whose message matches one of `patterns` (regular
    expressions, matched at the start) while `applies()` holds; every other record of
    that logger passes."""

    def __init__(
        self, patterns: tuple[str, ...], applies: Callable[[], bool] | None = None
    ) -> None:
        super().__init__()
        self.patterns = [re.compile(p) for p in patterns]
        self.applies = applies

    def filter(self, record: logging.LogRecord) -> bool:
        if self.applies is not None and not self.applies():
            return True
        message = record.getMessage()
        return not any(p.match(message) for p in self.patterns)


def _no_gpu_assigned() -> bool:
    """No GPU was given to this process (Slurm's or CUDA's device list is unset or empty):
    a CPU run is what the user asked for."""
    for name in ("SLURM_JOB_GPUS", "SLURM_STEP_GPUS", "CUDA_VISIBLE_DEVICES"):
        devices = os.environ.get(name, "").strip()
        if devices and devices not in ("-1", "none", "NoDevFiles"):
            return False
    return True


# Logger name -> its filter. The loggers are configured before their packages are
# imported (logging.getLogger returns the same object to them), so the filters hold from
# the first record on.
_LOG_FILTERS: dict[str, _DropMessages] = {
    # deepspeed/accelerator/real_accelerator.py, logged on DeepSpeed's own logger (which
    # prints to stdout) by every process that imports deepspeed on a machine with no GPU.
    # Kept where a GPU was assigned but not found: there it explains a slow run.
    "DeepSpeed": _DropMessages(
        (r"Setting accelerator to CPU\. If you have GPU or other accelerator",),
        _no_gpu_assigned,
    ),
    # bitsandbytes/backends/cpu/ops.py, at import on CPUs with AVX512-BF16 when the
    # `kernels` package is missing: that kernel only serves the repacked inference layout
    # that `disable_bnb_cpu_repack` turns off, so nothing is lost without it.
    "bitsandbytes.backends.cpu.ops": _DropMessages(
        (r"Failed to load CPU gemm_4bit_forward from kernels-community",)
    ),
    # transformers/utils/import_utils.py, once per image processor class when torchvision
    # is missing: bigft prepares images with the PIL processors it falls back to (its own
    # augmentation uses PIL too), so there is nothing to install.
    "transformers.utils.import_utils": _DropMessages(
        (r"`\w+ImageProcessor` requires torchvision \(not installed\); falling back to",)
    ),
}

# FutureWarnings torch raises for collectives DeepSpeed's ZeRO-3 calls in every step
# (deepspeed/comm/torch.py), attributed to torch/distributed/c10d_logger.py: 200 of them
# in a 4-step, 2-process CPU run, and the only FutureWarnings it printed. bigft calls
# neither function.
_TORCH_DEPRECATED_COLLECTIVES = ("all_gather_into_tensor", "reduce_scatter_tensor")


def quiet_upstream_noise() -> None:
    """Keep messages of upstream packages that tell a bigft user nothing out of the log.

    Upstream symptoms (deepspeed 0.19, bitsandbytes 0.50, torch 2.13, transformers 5.24):
    on a CPU machine every process that imports deepspeed prints "Setting accelerator to
    CPU. If you have GPU or other accelerator, we were unable to detect it."; importing
    bitsandbytes prints "Failed to load CPU gemm_4bit_forward from kernels-community:
    ..."; without torchvision, loading an image processor prints "`ViTImageProcessor`
    requires torchvision (not installed); falling back to `ViTImageProcessorPil` ..."; a
    ZeRO-3 run
    prints "`torch.distributed.all_gather_into_tensor` is deprecated" and
    "`torch.distributed.reduce_scatter_tensor` is deprecated" FutureWarnings at every
    step. Only those messages are dropped (by logger and text, or by warning category,
    module and text); everything else those packages log or warn still shows. A filter
    for a message a newer release no longer prints does nothing; the tests skip then,
    which says the shim can go. Safe to call more than once.
    """
    for name, drop in _LOG_FILTERS.items():
        logging.getLogger(name).addFilter(drop)  # a filter already there is not added twice
    for function in _TORCH_DEPRECATED_COLLECTIVES:
        warnings.filterwarnings(  # an identical filter replaces the earlier one
            "ignore",
            message=rf"`torch\.distributed\.{function}` is deprecated",
            category=FutureWarning,
            module=r"torch\.distributed\.c10d_logger",
        )
