"""Training throughput against peers: the same model, data, sequence length, optimizer and
(roughly) target tokens per optimizer step, on CPU, one thread per process.

    pip install -e '.[bench]'   # TRL
    python bench/throughput.py [--rounds 5] [--steps 4] [--json results.json]

Runs, each in its own process:

- bigft-packed: `bigft.loop.train` with data.packing=true (best-fit-decreasing packing,
  per-sequence position_ids);
- bigft-padded: the same with data.packing=false (micro-batches padded to their longest row);
- trainer-padded / trainer-grouped: transformers `Trainer` with `DataCollatorForSeq2Seq`
  (completion-only labels made the same way), random batches or
  `train_sampling_strategy="group_by_length"`;
- trl-packed: TRL `SFTTrainer` with packing=True (best-fit decreasing; TRL then runs
  padding-free, each micro-batch flattened into one row);
- trl-padding-free: `SFTTrainer` with padding_free=True and no packing.

Every process sets up and runs its warmup steps, then all wait. Timed windows of `--steps`
optimizer steps then go round-robin, one process at a time, `--rounds` times, so a change
in machine load hits every run alike and only one process computes at any moment. A window
runs from the end of the step before it to the end of its last step: data loading inside
the loop counts, start-up does not. The figure of merit is target tokens (tokens that
carry loss) per second.

A few steps of padded batches are a poor sample of an epoch: the cost of a batch is set by
its longest row, and long rows are rare. So padded runs train on batches picked evenly over
the sizes of an epoch's batches (`spread_batches`), each timed window holding one from each
part of the range: bigft-padded, trainer-padded and trl-padding-free on the same random
batches, trainer-grouped on batches of its own length-grouped epoch order (which visits
each mega-batch longest first). Packed rows all hold seq_len slots and are taken in their
trainer's own shuffled order. Prints a markdown table; figures go to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bigft.tiny import SPECIAL_TOKENS as SPECIALS
from bigft.tiny import wrap_tokenizer

RUNS = (
    "bigft-packed",
    "bigft-padded",
    "trainer-padded",
    "trainer-grouped",
    "trl-packed",
    "trl-padding-free",
)
TEMPLATE_WORDS = ["###", "Instruction", "Input", "Response", ":"]
READY = "READY"
WINDOW = "WINDOW "


@dataclass(frozen=True)
class Setting:
    """What every run shares."""

    seq_len: int = 512
    rows: int = 2000
    vocab_size: int = 8192
    hidden_size: int = 512
    num_layers: int = 6
    num_heads: int = 8
    num_kv_heads: int = 4
    intermediate_size: int = 1408
    lr: float = 1e-4
    packed_micro_batch: int = 2  # rows of seq_len tokens per micro-batch
    padded_micro_batch: int = 8  # rows per micro-batch, padded to the longest
    grad_accum: int = 1
    warmup: int = 1  # untimed optimizer steps per process
    steps: int = 4  # optimizer steps per timed window
    rounds: int = 5  # timed windows per process


class WindowMeter:
    """Counts micro-batches and, after the warmup steps and after every `steps` steps,
    reports a window on stdout and waits for the driver's go-ahead on stdin.

    Wall time and this process's CPU time are both recorded: CPU time is what the steps
    cost, wall time also holds any time other processes took the core away.
    """

    def __init__(self, pad_token_id: int, warmup: int, steps: int, windows: int) -> None:
        self.pad_token_id = pad_token_id
        self.warmup, self.steps, self.windows = warmup, steps, windows
        self.done = 0  # optimizer steps
        self.reported = 0
        self.counts = [0, 0, 0]  # targets, real tokens, slots
        self.wall = self.cpu = 0.0

    @property
    def total_steps(self) -> int:
        return self.warmup + self.steps * self.windows

    def add(self, batch: dict[str, Any]) -> None:
        """Count one micro-batch (targets as the shifted loss sees them)."""
        labels, ids = batch["labels"], batch["input_ids"]
        self.counts[0] += int((labels[:, 1:] != -100).sum())
        self.counts[1] += int((ids != self.pad_token_id).sum())
        self.counts[2] += int(ids.numel())

    def step_done(self) -> None:
        self.done += 1
        timed = self.done - self.warmup
        if timed < 0 or timed % self.steps:
            if timed < 0:
                self.counts = [0, 0, 0]
            return
        if timed == 0:
            print(READY, flush=True)
        else:
            seconds = time.perf_counter() - self.wall
            cpu_seconds = time.process_time() - self.cpu
            targets, real, slots = self.counts
            window = {
                "steps": self.steps,
                "seconds": seconds,
                "cpu_seconds": cpu_seconds,
                "step_s": seconds / self.steps,
                "targets_per_step": targets / self.steps,
                "slots_per_step": slots / self.steps,
                "real_over_slots": real / slots,
                "target_tokens_per_s": targets / seconds,
                "target_tokens_per_cpu_s": targets / cpu_seconds,
            }
            print(WINDOW + json.dumps(window), flush=True)
            self.reported += 1
            if self.reported == self.windows:
                os._exit(0)  # nothing after the last window is measured
        self.counts = [0, 0, 0]
        if not sys.stdin.readline():  # the driver's go-ahead; none: the driver is gone
            os._exit(1)
        self.wall, self.cpu = time.perf_counter(), time.process_time()


# -- shared inputs ---------------------------------------------------------------------


def make_words(count: int, seed: int) -> list[str]:
    """`count` distinct lowercase pseudo-words of 2-9 letters."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    words: dict[str, None] = {}
    while len(words) < count:
        size = int(rng.integers(2, 10))
        words["".join(rng.choice(letters, size))] = None
    return list(words)


def build_tokenizer(words: list[str]) -> Any:
    """Word-level fast tokenizer: one token per word or punctuation run, 8k-ish vocab."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(SPECIALS + TEMPLATE_WORDS + words)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return wrap_tokenizer(backend)


def alpaca_rows(n: int, words: list[str], seq_len: int, seed: int) -> list[dict[str, str]]:
    """Instruction rows with lognormal part lengths: many short rows, a long tail.

    Word counts are token counts (word-level tokenizer). Every row fits in `seq_len` with
    the prompt template, bos and eos, so no trainer truncates anything.
    """
    rng = np.random.default_rng(seed)
    weights = 1.0 / (np.arange(len(words)) + 10.0)  # Zipf-like word frequencies
    weights /= weights.sum()
    vocab = np.asarray(words)
    rows = []
    for _ in range(n):
        n_instr = int(np.clip(rng.lognormal(np.log(10), 0.5), 2, 60))
        n_input = int(np.clip(rng.lognormal(np.log(24), 0.9), 1, 200)) if rng.random() < 0.5 else 0
        n_out = int(np.clip(rng.lognormal(np.log(40), 1.0), 1, seq_len))
        fixed = 2 + (9 if n_input else 6)  # bos, eos, template tokens
        n_out = min(n_out, seq_len - fixed - n_instr - n_input)
        text = [" ".join(rng.choice(vocab, k, p=weights)) for k in (n_instr, n_input, n_out)]
        rows.append({"instruction": text[0], "input": text[1], "output": text[2]})
    return rows


def prompt_of(row: dict[str, str]) -> str:
    from bigft.data.formats import render_prompt

    return render_prompt("short", row["instruction"], row["input"])


def tokenize_alpaca(row: dict[str, str], tokenizer: Any) -> dict[str, list[int]]:
    """bos + prompt + output + eos, labels -100 on bos and prompt (completion-only)."""
    prompt = tokenizer(prompt_of(row), add_special_tokens=False)["input_ids"]
    output = tokenizer(row["output"], add_special_tokens=False)["input_ids"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    ids = [bos, *prompt, *output, eos]
    labels = [-100] * (1 + len(prompt)) + [*output, eos]
    return {"input_ids": ids, "labels": labels}


def prepare_inputs(root: Path, s: Setting) -> dict[str, Any]:
    """Model + tokenizer directory and the data files every run reads."""
    from bigft.tiny import build_tiny_llama

    words = make_words(s.vocab_size - len(SPECIALS) - len(TEMPLATE_WORDS), seed=0)
    tokenizer = build_tokenizer(words)
    assert len(tokenizer) == s.vocab_size, len(tokenizer)
    model = build_tiny_llama(
        vocab_size=s.vocab_size,
        hidden_size=s.hidden_size,
        num_layers=s.num_layers,
        num_heads=s.num_heads,
        num_kv_heads=s.num_kv_heads,
        intermediate_size=s.intermediate_size,
        max_positions=2 * s.seq_len,
    )
    params = sum(p.numel() for p in model.parameters())
    base = root / "base"
    model.save_pretrained(base)
    tokenizer.save_pretrained(base)
    rows = alpaca_rows(s.rows, words, s.seq_len, seed=0)
    (root / "alpaca.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    # TRL's prompt-completion format; "<s>" makes its token ids identical to the others'.
    trl_rows = [{"prompt": "<s>" + prompt_of(r), "completion": r["output"]} for r in rows]
    (root / "prompt_completion.jsonl").write_text("".join(json.dumps(r) + "\n" for r in trl_rows))
    tokenized = [tokenize_alpaca(r, tokenizer) for r in rows]
    # Padded runs all train on the same random batches, spread over the epoch's sizes.
    lengths = [len(t["input_ids"]) for t in tokenized]
    b = s.padded_micro_batch
    shuffled = np.random.default_rng(0).permutation(len(rows)).tolist()
    batches = [shuffled[i : i + b] for i in range(0, len(shuffled) - b + 1, b)]
    sizes = [b * max(lengths[i] for i in batch) for batch in batches]
    (root / "padded_order.json").write_text(json.dumps(spread_batches(batches, sizes, s)))
    return {"params": params, "tokenized": tokenized}


# -- data-only measurements -------------------------------------------------------------


def data_report(tokenized: list[dict[str, list[int]]], s: Setting) -> dict[str, Any]:
    """Length statistics, packing efficiency of bigft and TRL, padding waste of an epoch."""
    import torch
    from datasets import Dataset
    from transformers.trainer_pt_utils import LengthGroupedSampler
    from trl.data_utils import pack_dataset

    from bigft.data.packing import bin_pack

    lengths = np.asarray([len(t["input_ids"]) for t in tokenized])
    targets = np.asarray([sum(x != -100 for x in t["labels"]) for t in tokenized])
    real = int(lengths.sum())
    bigft_rows = len(bin_pack(lengths, s.seq_len))
    trl_packed = pack_dataset(Dataset.from_list(tokenized), s.seq_len, "bfd")
    trl_rows = len(trl_packed)
    trl_real = int(sum(sum(x) for x in trl_packed["seq_lengths"]))
    b = s.padded_micro_batch

    def waste(order: np.ndarray) -> float:
        batches = [lengths[order[i : i + b]] for i in range(0, len(order) - b + 1, b)]
        return 1 - sum(x.sum() for x in batches) / sum(x.max() * b for x in batches)

    rng = np.random.default_rng(0)
    random_waste = statistics.mean(waste(rng.permutation(len(lengths))) for _ in range(5))
    sampler = LengthGroupedSampler(
        b, lengths=lengths.tolist(), generator=torch.Generator().manual_seed(0)
    )
    grouped_waste = waste(np.asarray(list(sampler)))
    return {
        "rows": len(lengths),
        "length_p50_p90_p99_max": [int(np.percentile(lengths, q)) for q in (50, 90, 99)]
        + [int(lengths.max())],
        "mean_length": float(lengths.mean()),
        "target_fraction": float(targets.sum() / real),
        "bigft_packed_rows": bigft_rows,
        "bigft_packing_efficiency": real / (bigft_rows * s.seq_len),
        "trl_packed_rows": trl_rows,
        "trl_packing_efficiency": trl_real / (trl_rows * s.seq_len),
        "trl_tokens_kept": trl_real / real,
        "padding_waste_random": float(random_waste),
        "padding_waste_grouped": float(grouped_waste),
    }


# -- workers (one per process) ------------------------------------------------------------


def run_bigft(root: Path, s: Setting, packed: bool) -> None:
    import io

    import yaml
    from rich.console import Console

    import bigft.loop.train as bt
    from bigft.config_io import load_config
    from bigft.loop.run import Run

    name = "bigft-packed" if packed else "bigft-padded"
    config = {
        "model": {"name_or_path": str(root / "base")},
        "data": {
            "format": "alpaca",
            "train": str(root / "alpaca.jsonl"),
            "prompt_template": "short",
            "split": {"train": 1.0, "validation": 0.0},
            "packing": packed,
        },
        "train": {
            "seq_len": s.seq_len,
            "micro_batch_size": s.packed_micro_batch if packed else s.padded_micro_batch,
            "grad_accum": s.grad_accum,
            "steps": s.warmup + s.steps * s.rounds + 1,
            "precision": "fp32",
            "seed": 0,
            "max_grad_norm": 1.0,
            "log_every": 10,
        },
        "optim": {"name": "adamw", "lr": s.lr, "weight_decay": 0.0},
        "schedule": {"name": "constant", "warmup_steps": 0},
        "eval": {"every_steps": None},
        "checkpoint": {"export": False},
        "logging": {"progress_bar": False},
        "output_dir": str(root / name),
    }
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    run = bt.setup(load_config(path), Console(file=io.StringIO()))
    meter = WindowMeter(run.tokenizer.pad_token_id, s.warmup, s.steps, s.rounds)
    inner = bt.train_step

    def metered_step(run: Run, micro_batches: list[dict[str, Any]]) -> dict[str, float]:
        for batch in micro_batches:
            meter.add(batch)
        stats = inner(run, micro_batches)
        meter.step_done()
        return stats

    if not packed:
        if len(run.data.train) != s.rows:
            raise RuntimeError(f"bigft kept {len(run.data.train)} of {s.rows} rows")
        rows = np.asarray(padded_order(root))
        run.loader.order = lambda epoch: rows  # type: ignore[method-assign]
    bt.train_step = metered_step  # the loop looks train_step up at each call
    bt.train(run)


def _metered(base: type, meter: WindowMeter) -> type:
    """A Trainer subclass that counts each micro-batch it computes a loss on."""

    class Metered(base):  # type: ignore[valid-type, misc]
        def compute_loss(self, model: Any, inputs: dict[str, Any], *args: Any, **kw: Any) -> Any:
            meter.add(inputs)
            return super().compute_loss(model, inputs, *args, **kw)

    return Metered


def _step_callback(meter: WindowMeter) -> Any:
    from transformers import TrainerCallback

    class OnStepEnd(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            meter.step_done()

    return OnStepEnd()


def _common_args(root: Path, s: Setting, name: str, micro: int) -> dict[str, Any]:
    return {
        "output_dir": str(root / name),
        "per_device_train_batch_size": micro,
        "gradient_accumulation_steps": s.grad_accum,
        "max_steps": s.warmup + s.steps * s.rounds + 1,
        "learning_rate": s.lr,
        "lr_scheduler_type": "constant",
        "warmup_steps": 0,
        "weight_decay": 0.0,
        "max_grad_norm": 1.0,
        "optim": "adamw_torch",
        "seed": 0,
        "use_cpu": True,
        "bf16": False,
        "fp16": False,
        "gradient_checkpointing": False,
        "logging_steps": 10,
        "save_strategy": "no",
        "report_to": "none",
        "dataloader_num_workers": 0,
        "disable_tqdm": True,
    }


def _load_model(root: Path) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        root / "base", dtype=torch.float32, attn_implementation="sdpa"
    )


def spread_batches(batches: list[list[int]], sizes: list[int], s: Setting) -> list[int]:
    """Row order that makes every timed window a sample of the whole epoch's batches.

    The (micro-)batches, ordered by `sizes`, are cut into rounds x steps x grad_accum equal
    stretches and the middle batch of each is taken; window w gets stretches w, w + rounds,
    w + 2 rounds, ... (one from each part of the size range). The warmup and the step after
    the last window get middle-sized batches. Returns the rows, batch after batch.
    """
    ranked = [batches[i] for i in np.argsort(sizes, kind="stable")]
    per_window = s.steps * s.grad_accum  # micro-batches
    count = s.rounds * per_window
    picks = [ranked[int((i + 0.5) * len(ranked) / count)] for i in range(count)]
    middle = [ranked[len(ranked) // 2]] * s.grad_accum
    order = middle * s.warmup
    order += [picks[w + s.rounds * j] for w in range(s.rounds) for j in range(per_window)]
    return [row for batch in [*order, *middle] for row in batch]


class FixedOrder:
    """A sampler that yields the given row indices, in order."""

    def __init__(self, rows: list[int]) -> None:
        self.rows = rows

    def __iter__(self) -> Any:
        return iter(self.rows)

    def __len__(self) -> int:
        return len(self.rows)


def padded_order(root: Path) -> list[int]:
    """The rows every padded run trains on, in order (written by `prepare_inputs`)."""
    return list(json.loads((root / "padded_order.json").read_text()))


def run_trainer(root: Path, s: Setting, grouped: bool) -> None:
    from datasets import load_dataset
    from transformers import AutoTokenizer, DataCollatorForSeq2Seq, Trainer, TrainingArguments

    tokenizer = AutoTokenizer.from_pretrained(root / "base")
    raw = load_dataset("json", data_files=str(root / "alpaca.jsonl"), split="train")
    data = raw.map(
        tokenize_alpaca, fn_kwargs={"tokenizer": tokenizer}, remove_columns=raw.column_names
    )
    name = "trainer-grouped" if grouped else "trainer-padded"
    args = TrainingArguments(
        **_common_args(root, s, name, s.padded_micro_batch),
        train_sampling_strategy="group_by_length" if grouped else "random",
    )
    meter = WindowMeter(tokenizer.pad_token_id, s.warmup, s.steps, s.rounds)
    rows = padded_order(root)
    lengths = [len(ids) for ids in data["input_ids"]]
    b = s.padded_micro_batch

    class Sampled(_metered(Trainer, meter)):  # type: ignore[misc]
        def _get_train_sampler(self, *a: Any, **kw: Any) -> Any:
            if not grouped:
                return FixedOrder(rows)
            # The length-grouped epoch order, then batches of it spread over their sizes.
            order = list(super()._get_train_sampler(*a, **kw))
            batches = [order[i : i + b] for i in range(0, len(order) - b + 1, b)]
            sizes = [b * max(lengths[i] for i in batch) for batch in batches]
            return FixedOrder(spread_batches(batches, sizes, s))

    trainer = Sampled(
        model=_load_model(root),
        args=args,
        train_dataset=data,
        data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100),
        callbacks=[_step_callback(meter)],
    )
    trainer.train()


def run_trl(root: Path, s: Setting, packed: bool) -> None:
    from datasets import load_dataset
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(root / "base")
    data = load_dataset("json", data_files=str(root / "prompt_completion.jsonl"), split="train")
    name = "trl-packed" if packed else "trl-padding-free"
    micro = s.packed_micro_batch if packed else s.padded_micro_batch
    args = SFTConfig(
        **_common_args(root, s, name, micro),
        max_length=s.seq_len if packed else None,  # padding-free without packing: no truncation
        packing=packed,
        packing_strategy="bfd",
        padding_free=True,
        completion_only_loss=True,
        shuffle_dataset=False,
    )
    meter = WindowMeter(tokenizer.pad_token_id, s.warmup, s.steps, s.rounds)
    rows = None if packed else padded_order(root)

    class Sampled(_metered(SFTTrainer, meter)):  # type: ignore[misc]
        def _get_train_sampler(self, *a: Any, **kw: Any) -> Any:
            return super()._get_train_sampler(*a, **kw) if rows is None else FixedOrder(rows)

    trainer = Sampled(
        model=_load_model(root),
        args=args,
        train_dataset=data,
        processing_class=tokenizer,
        callbacks=[_step_callback(meter)],
    )
    trainer.train()


WORKERS: dict[str, Callable[[Path, Setting], None]] = {
    "bigft-packed": lambda root, s: run_bigft(root, s, True),
    "bigft-padded": lambda root, s: run_bigft(root, s, False),
    "trainer-padded": lambda root, s: run_trainer(root, s, False),
    "trainer-grouped": lambda root, s: run_trainer(root, s, True),
    "trl-packed": lambda root, s: run_trl(root, s, True),
    "trl-padding-free": lambda root, s: run_trl(root, s, False),
}


# -- driver ---------------------------------------------------------------------------------


class Worker:
    """One run's process: started at once, then stepped window by window."""

    def __init__(self, name: str, root: Path, s: Setting) -> None:
        self.name = name
        env = {
            **os.environ,
            "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "HF_DATASETS_CACHE": str(root / "hf-datasets"),
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_VERBOSITY": "error",
        }
        cmd = [sys.executable, __file__, "--worker", name, "--root", str(root)]
        cmd += ["--setting", json.dumps(asdict(s))]
        self.stderr = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 (lives with the process)
        self.proc = subprocess.Popen(
            cmd,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            text=True,
        )

    def _until(self, prefix: str) -> str:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(prefix):
                return line.removeprefix(prefix).strip()
        self.proc.wait()
        self.stderr.seek(0)
        raise RuntimeError(
            f"{self.name} exited ({self.proc.returncode}):\n{self.stderr.read()[-4000:]}"
        )

    def ready(self) -> None:
        self._until(READY)

    def window(self) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        return dict(json.loads(self._until(WINDOW)))


def summarize(runs: list[str], results: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Medians over rounds; ratios to bigft-packed are taken within each round first."""
    base = {r["round"]: r for r in results if r["run"] == "bigft-packed"}
    summary: dict[str, dict[str, Any]] = {}
    for name in runs:
        mine = [r for r in results if r["run"] == name]
        row: dict[str, Any] = {
            "targets_per_step": statistics.mean(r["targets_per_step"] for r in mine),
            "slots_per_step": statistics.mean(r["slots_per_step"] for r in mine),
            "real_over_slots": statistics.mean(r["real_over_slots"] for r in mine),
            "step_s": statistics.median(r["step_s"] for r in mine),
            # every window's targets over all their time: the whole sample as one run
            "pooled_target_tokens_per_s": sum(r["targets_per_step"] * r["steps"] for r in mine)
            / sum(r["seconds"] for r in mine),
        }
        for key in ("target_tokens_per_s", "target_tokens_per_cpu_s"):
            values = [r[key] for r in mine]
            ratios = [r[key] / base[r["round"]][key] for r in mine if r["round"] in base]
            row[key] = statistics.median(values)
            row[key + "_range"] = (min(values), max(values))
            row[key + "_vs_bigft_packed"] = statistics.median(ratios) if ratios else float("nan")
        summary[name] = row
    return summary


def print_report(s: Setting, info: dict[str, Any], summary: dict[str, dict[str, Any]]) -> None:
    d = info["data"]
    print(
        f"model: Llama {info['params'] / 1e6:.1f}M parameters (hidden {s.hidden_size}, "
        f"{s.num_layers} layers, {s.num_heads}/{s.num_kv_heads} heads, vocab {s.vocab_size}), "
        f"fp32, sdpa; seq_len {s.seq_len}; AdamW lr {s.lr}, constant, clip 1.0"
    )
    print(
        f"data: {d['rows']} alpaca rows, length p50/p90/p99/max "
        f"{'/'.join(map(str, d['length_p50_p90_p99_max']))} tokens (mean {d['mean_length']:.0f}), "
        f"{d['target_fraction']:.0%} of tokens are targets"
    )
    print(
        f"timing: {s.warmup} warmup step(s), then windows of {s.steps} steps, round-robin over "
        f"the runs' processes, {s.rounds} rounds; medians over rounds (ratios: median of "
        "per-round ratios); 1 thread per process\n"
    )
    print(
        "| run | micro-batch x accum | target tokens / step | slots / step | real / slots "
        "| s / step | target tokens/s, wall (min-max) | vs bigft packed "
        "| target tokens / CPU s (min-max) | vs bigft packed |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, row in summary.items():
        packed = name.endswith("packed")
        micro = s.packed_micro_batch if packed else s.padded_micro_batch
        shape = f"{micro} x {s.seq_len}" if packed else f"{micro} rows"
        cells = [
            name,
            f"{shape} x {s.grad_accum}",
            f"{row['targets_per_step']:.0f}",
            f"{row['slots_per_step']:.0f}",
            f"{row['real_over_slots']:.2f}",
            f"{row['step_s']:.2f}",
        ]
        for key in ("target_tokens_per_s", "target_tokens_per_cpu_s"):
            low, high = row[key + "_range"]
            cells += [
                f"{row[key]:.0f} ({low:.0f}-{high:.0f})",
                f"{row[key + '_vs_bigft_packed']:.2f}",
            ]
        print("| " + " | ".join(cells) + " |")
    print(
        f"\npacking efficiency (real tokens / (packed rows x {s.seq_len})), all {d['rows']} rows: "
        f"bigft {d['bigft_packing_efficiency']:.4f} ({d['bigft_packed_rows']} rows), "
        f"TRL bfd {d['trl_packing_efficiency']:.4f} ({d['trl_packed_rows']} rows, "
        f"{d['trl_tokens_kept']:.2%} of tokens kept)"
    )
    print(
        f"padding waste of micro-batches of {s.padded_micro_batch} over an epoch (1 - real/slots): "
        f"random {d['padding_waste_random']:.1%}, grouped by length "
        f"{d['padding_waste_grouped']:.1%}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=Setting.rounds, help="Windows per run.")
    parser.add_argument("--steps", type=int, default=Setting.steps, help="Steps per window.")
    parser.add_argument("--warmup", type=int, default=Setting.warmup, help="Untimed steps.")
    parser.add_argument("--runs", default=",".join(RUNS), help="Comma-separated run names.")
    parser.add_argument("--json", type=Path, help="Also write every figure to this file.")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--setting", help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # deepspeed (imported, unused) stays quiet
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    if args.worker:
        WORKERS[args.worker](args.root, Setting(**json.loads(args.setting)))
        return

    if min(args.rounds, args.steps, args.warmup) < 1:
        parser.error("--rounds, --steps and --warmup must be at least 1")
    s = Setting(steps=args.steps, warmup=args.warmup, rounds=args.rounds)
    runs = [r for r in args.runs.split(",") if r]
    unknown = sorted(set(runs) - set(RUNS))
    if unknown:
        parser.error(f"unknown runs {unknown}; choose from {', '.join(RUNS)}")
    start = time.perf_counter()
    root = Path(tempfile.mkdtemp(prefix="bigft-throughput-"))
    workers: list[Worker] = []
    try:
        prepared = prepare_inputs(root, s)
        info: dict[str, Any] = {
            "params": prepared["params"],
            "data": data_report(prepared["tokenized"], s),
        }
        workers += [Worker(name, root, s) for name in runs]
        for w in workers:
            w.ready()
        info["setup_s"] = time.perf_counter() - start
        results = []
        for round_ in range(s.rounds):
            for w in workers:
                result = {"run": w.name, "round": round_, **w.window()}
                results.append(result)
                print(
                    f"round {round_} {w.name}: {result['target_tokens_per_s']:.0f} target tok/s, "
                    f"{result['step_s']:.2f} s/step",
                    file=sys.stderr,
                    flush=True,
                )
        for w in workers:
            w.proc.wait()
        summary = summarize(runs, results)
        print_report(s, info, summary)
        total = time.perf_counter() - start
        print(
            f"\n_total bench time: {total:.0f} s "
            f"(set-up of all processes: {info['setup_s']:.0f} s)_"
        )
        if args.json:
            payload = {"setting": asdict(s), **info, "summary": summary, "results": results}
            args.json.write_text(json.dumps(payload, indent=2))
    finally:
        for w in workers:
            if w.proc.poll() is None:
                w.proc.kill()
                w.proc.wait()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
