"""Workarounds for upstream quirks, each with its symptom, a version guard and a test.

No other bigft module patches a library; when an upstream release fixes a quirk, its
shim here is deleted together with its test.
"""

from __future__ import annotations

import logging
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
    import warnings

    from torchdata.stateful_dataloader import StatefulDataLoader

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="'set_vital' is deprecated")
        return StatefulDataLoader(dataset, **kwargs)
