"""Small builders shared by tests: data rows and configs around the tiny base model."""

from __future__ import annotations

import json
import random
import socket
import sys
from pathlib import Path
from typing import Any

import yaml


def alpaca_rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    """Uppercase/reverse instructions over random words: learnable in a few dozen steps."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        word = "".join(rng.choice("abcdefgh") for _ in range(rng.randint(2, 7)))
        if rng.random() < 0.5:
            rows.append({"instruction": "Uppercase.", "input": word, "output": word.upper()})
        else:
            rows.append({"instruction": "Reverse.", "input": word, "output": word[::-1]})
    return rows


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_config(path: Path, model_dir: Path, train_file: Path, **sections: Any) -> Path:
    """A small alpaca run config; keyword sections are merged over the defaults."""
    config: dict[str, Any] = {
        "model": {"name_or_path": str(model_dir)},
        "data": {
            "format": "alpaca",
            "train": str(train_file),
            "prompt_template": "{instruction}\n{input}\n",
            "split": {"train": 0.8, "validation": 0.2},
        },
        "train": {
            "seq_len": 64,
            "micro_batch_size": 2,
            "steps": 10,
            "precision": "fp32",
            "seed": 0,
        },
        "optim": {"lr": 3.0e-3},
        "schedule": {"name": "constant", "warmup_steps": 0},
        "logging": {"progress_bar": False},
        "output_dir": str(path.parent / "out"),
    }
    for name, values in sections.items():
        if isinstance(values, dict) and isinstance(config.get(name), dict):
            config[name].update(values)
        else:
            config[name] = values
    path.write_text(yaml.safe_dump(config))
    return path


def free_port() -> int:
    """A TCP port on localhost that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def torchrun(script: str | Path, *args: str, nproc: int = 2) -> list[str]:
    """The command line that runs `script args...` in `nproc` processes on this machine."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(nproc),
        "--master_port",
        str(free_port()),
        str(script),
        *args,
    ]


# ~19M parameters: a real Llama shape for planner comparisons, built from its config.
SMALL_LLAMA = {
    "model_type": "llama",
    "hidden_size": 256,
    "intermediate_size": 688,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 32000,
}


def alive_probe(measure: Any) -> Any:
    """A dispatch mode that watches the tensors ops create (views excluded) which
    `measure(tensor)` sizes (None for the others): `largest`, the most one of them had,
    and `peak`, the most alive at once."""
    import weakref

    from torch.utils._python_dispatch import TorchDispatchMode

    class AliveProbe(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.largest = self.live = self.peak = 0

        def _freed(self, size: int) -> None:
            self.live -= size

        def __torch_dispatch__(
            self, func: Any, types: Any, args: Any = (), kwargs: Any = None
        ) -> Any:
            out = func(*args, **(kwargs or {}))
            if not func.is_view:
                for t in out if isinstance(out, tuple | list) else (out,):
                    size = measure(t) if hasattr(t, "untyped_storage") else None
                    if size is not None:
                        self.largest = max(self.largest, size)
                        self.live += size
                        self.peak = max(self.peak, self.live)
                        weakref.finalize(t.untyped_storage(), self._freed, size)
            return out

    return AliveProbe()
