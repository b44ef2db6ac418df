"""DPO pairs per second: bigft's task preference against TRL's DPOTrainer, the same tiny model,
data and settings, on CPU, one thread per process.

    python -m venv --system-site-packages /tmp/trl-venv && /tmp/trl-venv/bin/pip install trl
    OMP_NUM_THREADS=1 python bench/dpo_throughput.py --trl-python /tmp/trl-venv/bin/python \
        [--rounds 2] [--warmup 10] [--steps 30] [--json results.json] [--keep]

Two settings, each trained by both:

- lora: adapters (r 16, alpha 32, no dropout) on every linear layer of the blocks; the
  reference is the policy with its adapters disabled (bigft: peft's `disable_adapter`;
  TRL: `ref_model=None` with a `peft_config`, its `use_adapter(None)`);
- full: every parameter trained; the reference is a frozen second copy of the base (bigft:
  `run.teacher`; TRL: `ref_model=None` without peft, which loads one from the same directory).

Both compute the reference on the fly, one no-grad forward of the step's chosen and rejected
sequences beside the policy's forward and backward (TRL: `precompute_ref_log_probs=False`).
Same for both: a Llama made in code with the character tokenizer of `bigft.tiny`, fp32,
sdpa; sigmoid DPO loss, beta 0.1; torch AdamW, constant lr, weight decay 0, clip 1.0; no
evaluation, no checkpoints, a log line every step. Every pair is "upper <8 words> =" with
the words in capitals as chosen and one letter left in lower case as rejected, so every
sequence is exactly 121 tokens (bos + prompt + completion + eos; TRL's prompts start with
"<s>" so that its ids are bigft's): no padding, no truncation, the same work in every step
whatever order a trainer draws the pairs in.

bigft runs as a user runs it, `python -m bigft train CONFIG`; TRL runs this script as a
worker under `--trl-python` (an interpreter with trl installed). Each run is its own
process, one at a time; `--rounds` repeats the four runs, bigft first in even rounds and
TRL first in odd ones, so a drift in machine load hits both trainers alike.

What is timed, for both alike: optimizer steps `warmup` + 1 to `warmup + steps`, from the
end of the step before them to the end of the last (bigft: the `time` of its metrics.jsonl
records, written as each step ends; TRL: a callback's clock at `on_step_end`). Start-up,
model loading, data preparation and the first `warmup` steps are not timed. Three figures
of pairs/s: steps x pairs per step over the window's wall time; the same over the
process's CPU time (bigft: /proc/PID/stat, read by this script as each record appears;
TRL: `time.process_time()` in the callback; one thread, so what the steps cost, less
inflated by other work on the machine than wall time); and pairs per step over the median
step's wall time (robust to another process taking the core for a while). Ratios are
taken within each round, then the median. Prints a markdown table; figures go to
bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # bigft from this checkout, installed or not
SETTINGS = ("lora", "full")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass(frozen=True)
class Setting:
    """What every run shares."""

    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    seq_len: int = 128
    pairs: int = 1000  # rows of data (more than any run reads)
    words: int = 8  # words per prompt, 6 letters each: 121 tokens per sequence
    batch: int = 8  # pairs per optimizer step (one micro-batch: 16 sequences)
    beta: float = 0.1
    lr_lora: float = 2e-3
    lr_full: float = 5e-4
    lora_r: int = 16
    lora_alpha: int = 32
    warmup: int = 10  # untimed optimizer steps
    steps: int = 30  # timed optimizer steps
    rounds: int = 2

    def lr(self, setting: str) -> float:
        return self.lr_lora if setting == "lora" else self.lr_full


def pairs(n: int, words: int, seed: int = 0) -> list[dict[str, str]]:
    """`n` pairs of the same length: the prompt's words upper-cased (chosen) or with one
    letter left in lower case (rejected). Every word has 6 letters, so every sequence has
    as many tokens under a character tokenizer."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        text = " ".join("".join(rng.choice("abcdefgh") for _ in range(6)) for _ in range(words))
        good = text.upper()
        j = rng.choice([i for i, c in enumerate(text) if c != " "])
        bad = good[:j] + text[j] + good[j + 1 :]
        rows.append({"prompt": f"upper {text} =", "chosen": f" {good}", "rejected": f" {bad}"})
    return rows


def prepare_inputs(root: Path, s: Setting) -> dict[str, Any]:
    """The base model + tokenizer directory and the two data files (bigft's rows, and the
    same rows with "<s>" before each prompt for TRL). Returns parameter count and tokens
    per sequence."""
    from bigft.tiny import save_tiny_base

    base = save_tiny_base(
        root / "base",
        hidden_size=s.hidden_size,
        num_layers=s.num_layers,
        num_heads=s.num_heads,
        num_kv_heads=s.num_kv_heads,
        max_positions=2 * s.seq_len,
    )
    rows = pairs(s.pairs, s.words)
    (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    trl_rows = [{**r, "prompt": "<s>" + r["prompt"]} for r in rows]
    (root / "trl_pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in trl_rows))

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    lengths = {
        len(tokenizer(r["prompt"] + r[side] + "</s>")["input_ids"])
        for r in trl_rows
        for side in ("chosen", "rejected")
    }
    if len(lengths) != 1 or max(lengths) > s.seq_len:
        raise RuntimeError(f"sequence lengths {sorted(lengths)}: want one length <= seq_len")
    model = AutoModelForCausalLM.from_pretrained(base)
    return {"params": sum(p.numel() for p in model.parameters()), "tokens": lengths.pop()}


# -- bigft: the command line ---------------------------------------------------------------


def bigft_config(root: Path, s: Setting, setting: str, name: str) -> Path:
    import yaml

    method: dict[str, Any] = {"name": "full"}
    if setting == "lora":
        lora = {"r": s.lora_r, "alpha": s.lora_alpha, "dropout": 0.0, "target_modules": TARGETS}
        method = {"name": "lora", "lora": lora}
    config = {
        "task": "preference",
        "model": {"name_or_path": str(root / "base"), "attn_implementation": "sdpa"},
        "data": {
            "format": "text",
            "train": str(root / "pairs.jsonl"),
            "split": {"train": 1.0, "validation": 0.0, "test": 0.0},
        },
        "preference": {"loss": "dpo", "beta": s.beta},
        "method": method,
        "train": {
            "seq_len": s.seq_len,
            "micro_batch_size": s.batch,
            "grad_accum": 1,
            "steps": s.warmup + s.steps,
            "precision": "fp32",
            "seed": 0,
            "max_grad_norm": 1.0,
            "log_every": 1,
        },
        "optim": {"name": "adamw", "lr": s.lr(setting), "weight_decay": 0.0},
        "schedule": {"name": "constant", "warmup_steps": 0},
        "eval": {"every_steps": None},
        "checkpoint": {"export": False},
        "logging": {"progress_bar": False, "trackers": []},
        "output_dir": str(root / name),
    }
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run_bigft(root: Path, s: Setting, setting: str, name: str, env: dict[str, str]) -> dict:
    """`python -m bigft train CONFIG`; step times and losses from its metrics.jsonl.

    The process's CPU time (all its threads, /proc/PID/stat) is read as each step's record
    appears in metrics.jsonl, whose size is polled every 50 ms: a reading is up to 50 ms
    late, at the start of a window as at its end (under 0.5% of a 30-step window). The
    poll is a stat call, so the driver takes next to no CPU from the run."""
    path = bigft_config(root, s, setting, name)
    log, metrics = root / f"{name}.log", root / name / "metrics.jsonl"
    cpu: dict[int, float] = {}
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "bigft", "train", str(path)],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        done = 0  # characters of metrics.jsonl read, up to the last complete line
        while proc.poll() is None:
            time.sleep(0.05)
            if not metrics.exists() or metrics.stat().st_size == done:
                continue
            seconds = _cpu_seconds(proc.pid)
            text = metrics.read_text()[done:]
            complete = text[: text.rfind("\n") + 1]
            done += len(complete)
            for line in complete.splitlines():
                step = json.loads(line).get("step")
                if step is not None and step not in cpu and seconds is not None:
                    cpu[step] = seconds
    if proc.returncode:
        raise RuntimeError(f"{name} exited {proc.returncode}:\n{log.read_text()[-4000:]}")
    records = [json.loads(line) for line in metrics.open()]
    steps = [r for r in records if "split" not in r and "loss" in r and "step" in r]
    return {
        "clock": {r["step"]: r["time"] for r in steps},
        "cpu": cpu,
        "loss": {r["step"]: r["loss"] for r in steps},
        "accuracy": {r["step"]: r.get("rewards/accuracy") for r in steps},
    }


def _cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a running process (all its threads), None if gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -- TRL: a worker under --trl-python ----------------------------------------------------------


def trl_worker(root: Path, s: Setting, setting: str, name: str) -> None:
    """Train with DPOTrainer and write step clocks, losses and the first batch's shape to
    root/name.json."""
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    record: dict[str, Any] = {"clock": {}, "cpu": {}, "loss": {}, "accuracy": {}}

    class StepClock(TrainerCallback):  # type: ignore[misc]
        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            record["clock"][state.global_step] = time.time()
            record["cpu"][state.global_step] = time.process_time()

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
            if logs and "loss" in logs:
                record["loss"][state.global_step] = logs["loss"]
                record["accuracy"][state.global_step] = logs.get("rewards/accuracies")

    class Shaped(DPOTrainer):  # type: ignore[misc]
        def compute_loss(self, model: Any, inputs: Any, *a: Any, **kw: Any) -> Any:
            if "batch" not in record:
                ids, mask = inputs["input_ids"], inputs["attention_mask"]
                record["batch"] = {"shape": list(ids.shape), "tokens": int(mask.sum())}
            return super().compute_loss(model, inputs, *a, **kw)

    base = root / "base"
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(
        base, dtype=torch.float32, attn_implementation="sdpa"
    )
    peft_config = None
    if setting == "lora":
        from peft import LoraConfig

        peft_config = LoraConfig(
            r=s.lora_r,
            lora_alpha=s.lora_alpha,
            lora_dropout=0.0,
            target_modules=TARGETS,
            task_type="CAUSAL_LM",
        )
    args = DPOConfig(
        output_dir=str(root / name),
        per_device_train_batch_size=s.batch,
        gradient_accumulation_steps=1,
        max_steps=s.warmup + s.steps,
        learning_rate=s.lr(setting),
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        optim="adamw_torch",
        seed=0,
        use_cpu=True,
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        logging_steps=1,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        dataloader_num_workers=0,
        disable_tqdm=True,
        beta=s.beta,
        loss_type=["sigmoid"],
        max_length=s.seq_len,
        precompute_ref_log_probs=False,
    )
    data = load_dataset("json", data_files=str(root / "trl_pairs.jsonl"), split="train")
    trainer = Shaped(
        model=model,
        ref_model=None,
        args=args,
        train_dataset=data,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[StepClock()],
    )
    record["reference"] = "copy" if trainer.ref_model is not None else "adapters disabled"
    trainer.train()
    (root / f"{name}.json").write_text(json.dumps(record))


def run_trl(
    root: Path, s: Setting, setting: str, name: str, env: dict[str, str], python: str
) -> dict:
    cmd = [python, __file__, "--worker", setting, "--name", name, "--root", str(root)]
    cmd += ["--setting", json.dumps(asdict(s))]
    log = root / f"{name}.log"
    with log.open("w") as out:
        done = subprocess.run(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    if done.returncode:
        raise RuntimeError(f"{name} exited {done.returncode}:\n{log.read_text()[-4000:]}")
    record = json.loads((root / f"{name}.json").read_text())
    steps = ("clock", "cpu", "loss", "accuracy")  # JSON made their step keys strings
    return {k: {int(i): x for i, x in v.items()} if k in steps else v for k, v in record.items()}


# -- driver -------------------------------------------------------------------------------------


def window(result: dict, s: Setting) -> dict[str, Any]:
    """Pairs/s over the timed steps (wall and CPU time), pairs/s of the median timed step
    (wall: robust to another process taking the core now and then), and the losses."""
    clock, cpu, loss = result["clock"], result["cpu"], result["loss"]
    first, last = s.warmup, s.warmup + s.steps
    timed = range(first, last + 1)
    missing = [step for step in timed if step not in clock or step not in cpu]
    if missing:
        raise RuntimeError(f"no clock for steps {missing}")
    seconds, cpu_seconds = clock[last] - clock[first], cpu[last] - cpu[first]
    step_s = statistics.median(clock[i] - clock[i - 1] for i in timed[1:])
    return {
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "median_step_s": step_s,
        "wall": s.steps * s.batch / seconds,
        "cpu": s.steps * s.batch / cpu_seconds,
        "median step": s.batch / step_s,
        "loss_first": loss.get(1, float("nan")),
        "loss_last": loss.get(last, float("nan")),
        "accuracy_last": result["accuracy"].get(last),
    }


MEASURES = {
    "wall": "wall, {steps} steps",
    "cpu": "CPU, {steps} steps",
    "median step": "wall, median step",
}


def print_report(s: Setting, info: dict[str, Any], results: list[dict[str, Any]]) -> None:
    print(
        f"model: Llama {info['params'] / 1e6:.2f}M parameters (hidden {s.hidden_size}, "
        f"{s.num_layers} layers, {s.num_heads}/{s.num_kv_heads} heads, vocab 100 characters), "
        f"fp32, sdpa; DPO sigmoid, beta {s.beta}; {s.batch} pairs per step = "
        f"{2 * s.batch} sequences of {info['tokens']} tokens (no padding); AdamW constant lr "
        f"(lora {s.lr_lora}, full {s.lr_full}), clip 1.0; lora r {s.lora_r} alpha "
        f"{s.lora_alpha} on {','.join(TARGETS)}"
    )
    print(
        f"timing: steps {s.warmup} -> {s.warmup + s.steps} ({s.steps} steps) of each run, "
        f"{s.rounds} rounds of the 4 runs one at a time; medians over rounds; 1 thread per "
        f"process; load average {info['load_before']} before, {info['load_after']} after\n"
    )
    print("| setting | time | bigft pairs/s (rounds) | TRL pairs/s (rounds) | bigft / TRL |")
    print("|---|---|---|---|---|")
    for setting in SETTINGS:
        for key, label in MEASURES.items():
            bigft, trl = (
                [r[key] for r in results if r["setting"] == setting and r["trainer"] == who]
                for who in ("bigft", "trl")
            )
            ratios = [b / t for b, t in zip(bigft, trl, strict=True)]  # within each round
            cells = [setting, label.format(steps=s.steps)]
            for values in (bigft, trl):
                each = " / ".join(f"{v:.2f}" for v in values)
                cells.append(f"{statistics.median(values):.2f} ({each})")
            cells.append(f"{statistics.median(ratios):.2f}")
            print("| " + " | ".join(cells) + " |")
    print(
        "\nratios: median of the per-round ratios. sanity (round 0): loss at step 1 and at "
        f"step {s.warmup + s.steps}, reward accuracy at step {s.warmup + s.steps}, seconds "
        "per timed step (wall, CPU)"
    )
    for r in results:
        if r["round"] == 0:
            extra = f"; reference: {r['reference']}" if "reference" in r else ""
            extra += f"; first batch {r['batch']}" if "batch" in r else ""
            print(
                f"- {r['trainer']} {r['setting']}: loss {r['loss_first']:.4f} -> "
                f"{r['loss_last']:.4f}, accuracy {r['accuracy_last']}, "
                f"{r['seconds'] / s.steps:.3f} / {r['cpu_seconds'] / s.steps:.3f} s{extra}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trl-python", help="An interpreter with trl installed.")
    parser.add_argument("--rounds", type=int, default=Setting.rounds, help="Repeats of the runs.")
    parser.add_argument("--warmup", type=int, default=Setting.warmup, help="Untimed steps.")
    parser.add_argument("--steps", type=int, default=Setting.steps, help="Timed steps.")
    parser.add_argument("--json", type=Path, help="Also write every figure to this file.")
    parser.add_argument("--keep", action="store_true", help="Keep the runs' directories.")
    parser.add_argument("--worker", choices=SETTINGS, help=argparse.SUPPRESS)
    parser.add_argument("--name", help=argparse.SUPPRESS)
    parser.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--setting", help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # deepspeed (imported, unused) stays quiet
    if args.worker:
        import torch

        torch.set_num_threads(1)
        trl_worker(args.root, Setting(**json.loads(args.setting)), args.worker, args.name)
        return
    if not args.trl_python:
        parser.error("--trl-python is required (an interpreter with trl installed)")
    if min(args.rounds, args.steps, args.warmup) < 1:
        parser.error("--rounds, --steps and --warmup must be at least 1")
    s = Setting(rounds=args.rounds, warmup=args.warmup, steps=args.steps)
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_VERBOSITY": "error",
        "DS_ACCELERATOR": "cpu",
    }
    start = time.perf_counter()
    root = Path(tempfile.mkdtemp(prefix="bigft-dpo-throughput-"))
    env["HF_DATASETS_CACHE"] = str(root / "hf-datasets")
    try:
        run_all(root, s, env, args.trl_python, args.json)
    finally:
        if args.keep:
            print(f"run directories: {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)
    print(f"\n_total bench time: {time.perf_counter() - start:.0f} s_")


def run_all(root: Path, s: Setting, env: dict[str, str], trl_python: str, out: Path | None) -> None:
    """Every round's four runs, one at a time; the report (and `out`, a JSON of every figure)."""
    info: dict[str, Any] = prepare_inputs(root, s)
    info["load_before"] = " ".join(f"{x:.1f}" for x in os.getloadavg())
    results = []
    for round_ in range(s.rounds):
        for setting in SETTINGS:
            # odd rounds run TRL first, so a drift in machine load does not favour one side
            for trainer in ("bigft", "trl")[:: 1 if round_ % 2 == 0 else -1]:
                name = f"{trainer}-{setting}-{round_}"
                if trainer == "bigft":
                    raw = run_bigft(root, s, setting, name, env)
                else:
                    raw = run_trl(root, s, setting, name, env, trl_python)
                row = {"trainer": trainer, "setting": setting, "round": round_, **window(raw, s)}
                row.update({k: raw[k] for k in ("reference", "batch") if k in raw})
                results.append(row)
                print(
                    f"{name}: {row['wall']:.2f} pairs/s, {row['cpu']:.2f} pairs / CPU s",
                    file=sys.stderr,
                    flush=True,
                )
    info["load_after"] = " ".join(f"{x:.1f}" for x in os.getloadavg())
    print_report(s, info, results)
    if out:
        out.write_text(json.dumps({"setting": asdict(s), **info, "results": results}, indent=2))


if __name__ == "__main__":
    main()
