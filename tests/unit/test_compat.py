"""bigft._compat: each shim fixes its upstream symptom, and the symptom is real."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("bitsandbytes")
pytest.importorskip("peft")

IDS = torch.tensor([[1, 40, 41, 42, 43, 10, 50, 51, 52, 10, 60, 61]])


def _qlora_model(tiny_base: Path) -> Any:
    """The tiny base loaded in 4 bits the way training loads it, with LoRA adapters."""
    from bigft.config import Config
    from bigft.model.load import load_model
    from bigft.model.methods import apply_method

    cfg = Config.model_validate(
        {
            "model": {"name_or_path": str(tiny_base)},
            "data": {"train": "unused.jsonl"},
            "method": {
                "name": "qlora",
                "quant": {"compute_dtype": "float32"},
                "lora": {"dropout": 0.0},
            },
            "output_dir": "unused",
        }
    )
    model = apply_method(load_model(cfg.model, quant=cfg.method.quant), cfg)
    for name, param in model.named_parameters():  # non-zero B so base grads matter
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.1)
    return model


def _grads(model: Any) -> dict[str, torch.Tensor]:
    model.train()
    model.zero_grad(set_to_none=True)
    model(input_ids=IDS, labels=IDS).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _eval_pass(model: Any) -> None:
    model.eval()
    with torch.no_grad():
        model(input_ids=IDS)


def test_gradients_after_an_eval_pass_equal_those_before(tiny_base) -> None:
    model = _qlora_model(tiny_base)  # load_model applied disable_bnb_cpu_repack
    before = _grads(model)
    _eval_pass(model)
    after = _grads(model)
    assert before.keys() == after.keys() and before
    for name in before:
        torch.testing.assert_close(after[name], before[name], rtol=0, atol=0)


def test_without_the_shim_an_eval_pass_corrupts_gradients(tiny_base) -> None:
    """Proves the test above can fail: the upstream repack is live on this CPU."""
    from bitsandbytes.functional import has_avx512bf16
    from bitsandbytes.nn import Linear4bit

    if not has_avx512bf16():
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes never repacks here")
    model = _qlora_model(tiny_base)
    layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
    for layer in layers:
        layer.support_avx512bf16_for_cpu = True  # what bitsandbytes sets by itself
    before = _grads(model)
    _eval_pass(model)
    after = _grads(model)
    assert any(not torch.allclose(after[n], before[n], atol=1e-4) for n in before)


def test_shim_changes_only_repacking_layers(tiny_base) -> None:
    from bigft._compat import disable_bnb_cpu_repack

    model = _qlora_model(tiny_base)
    assert disable_bnb_cpu_repack(model) == 0  # already applied at load
    assert disable_bnb_cpu_repack(torch.nn.Linear(4, 4)) == 0


def test_click_exceptions_are_the_ones_typer_raises() -> None:
    """A bad flag value reaches bigft's one-line handler only if the handler catches the
    click copy typer really uses."""
    import typer
    from typer.testing import CliRunner

    from bigft._compat import click_exceptions

    app = typer.Typer()

    @app.command()
    def count(n: int = typer.Option(1, "--n")) -> None:
        """One command, one integer flag."""

    result = CliRunner().invoke(app, ["--n", "abc"], standalone_mode=False)
    assert isinstance(result.exception, click_exceptions().BadParameter)
    assert issubclass(click_exceptions().BadParameter, click_exceptions().UsageError)


def test_stateful_dataloader_is_built_without_the_deprecation_warning() -> None:
    import warnings

    from torchdata.stateful_dataloader import StatefulDataLoader

    from bigft._compat import stateful_dataloader

    with warnings.catch_warnings(record=True) as raw:
        warnings.simplefilter("always")
        StatefulDataLoader([1, 2, 3], batch_size=2)
    if not any("set_vital" in str(w.message) for w in raw):
        pytest.skip("this torchdata / torch pair no longer warns: the shim can go")
    with warnings.catch_warnings(record=True) as shimmed:
        warnings.simplefilter("always")
        loader = stateful_dataloader([1, 2, 3], batch_size=2)
    assert not shimmed
    assert [b.tolist() for b in loader] == [[1, 2], [3]]


NOISE_SCRIPT = """
import logging, sys, tempfile, warnings

if sys.argv[1] == "bigft":
    import bigft.commands  # what `python -m bigft` and the `bigft` script import first
import torch
import torch.distributed as dist
import deepspeed
import bitsandbytes

dist.init_process_group("gloo", init_method="file://" + tempfile.mktemp(), rank=0, world_size=1)
for _ in range(2):  # what ZeRO-3 calls in every step
    dist.all_gather_into_tensor(torch.zeros(2), torch.ones(2))
    dist.reduce_scatter_tensor(torch.zeros(2), torch.ones(2))
dist.destroy_process_group()
warnings.warn_explicit(
    "`torch.distributed.other` is deprecated", FutureWarning, "c10d_logger.py", 1,
    module="torch.distributed.c10d_logger",
)
warnings.warn("an unrelated FutureWarning", FutureWarning)
logging.getLogger("DeepSpeed").warning("another DeepSpeed warning")
logging.getLogger("bitsandbytes.backends.cpu.ops").warning("another bitsandbytes warning")
from transformers import ViTImageProcessor  # without torchvision: the PIL processor
from transformers.utils import logging as hf_logging
hf_logging.get_logger("transformers.utils.import_utils").warning("another transformers warning")
"""

UPSTREAM_NOISE = {
    "deepspeed": "Setting accelerator to CPU. If you have GPU or other accelerator",
    "bitsandbytes": "Failed to load CPU gemm_4bit_forward from kernels-community",
    "all_gather": "`torch.distributed.all_gather_into_tensor` is deprecated",
    "reduce_scatter": "`torch.distributed.reduce_scatter_tensor` is deprecated",
    "torchvision": "`ViTImageProcessor` requires torchvision (not installed)",
}
STILL_SHOWN = (
    "`torch.distributed.other` is deprecated",
    "an unrelated FutureWarning",
    "another DeepSpeed warning",
    "another bitsandbytes warning",
    "another transformers warning",
)


def _noise_output(tmp_path: Path, mode: str) -> str:
    """stdout + stderr of a CPU process importing deepspeed and bitsandbytes and calling
    the collectives ZeRO-3 uses, with bigft's CLI imported first or not."""
    import os
    import subprocess
    import sys

    script = tmp_path / "noise.py"
    script.write_text(NOISE_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONWARNINGS", "COLUMNS")}
    for name in ("CUDA_VISIBLE_DEVICES", "SLURM_JOB_GPUS", "SLURM_STEP_GPUS"):
        env.pop(name, None)  # a CPU run
    proc = subprocess.run(
        [sys.executable, str(script), mode],
        capture_output=True,
        text=True,
        env={**env, "OMP_NUM_THREADS": "1"},
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def test_a_bigft_command_drops_exactly_the_upstream_noise(tmp_path) -> None:
    pytest.importorskip("deepspeed")
    without = _noise_output(tmp_path, "plain")
    printed = {key for key, text in UPSTREAM_NOISE.items() if text in without}
    if not printed:
        pytest.skip("these releases print none of the messages: the shim can go")
    assert all(text in without for text in STILL_SHOWN), without

    with_bigft = _noise_output(tmp_path, "bigft")
    for key in printed:
        assert UPSTREAM_NOISE[key] not in with_bigft, (key, with_bigft)
    for text in STILL_SHOWN:  # the same loggers and module still speak
        assert text in with_bigft, (text, with_bigft)


def test_the_deepspeed_cpu_message_stays_where_a_gpu_was_assigned(monkeypatch) -> None:
    """A job given a GPU that torch cannot see runs on the CPU: there the message says why."""
    import logging

    from bigft._compat import quiet_upstream_noise

    quiet_upstream_noise()
    logger = logging.getLogger("DeepSpeed")
    message = UPSTREAM_NOISE["deepspeed"] + ", we were unable to detect it."
    record = logger.makeRecord("DeepSpeed", logging.WARNING, __file__, 1, message, None, None)
    for name in ("CUDA_VISIBLE_DEVICES", "SLURM_JOB_GPUS", "SLURM_STEP_GPUS"):
        monkeypatch.delenv(name, raising=False)
    assert not logger.filter(record)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    assert logger.filter(record)
