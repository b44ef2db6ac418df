"""Data preparation at scale: `bigft data prepare` against TRL's SFTTrainer preparation.

    python bench/dataprep.py [--rows 1000000] [--chat-rows 0] [--num-proc 1,2] [--seq-len 512]
                             [--trl-python /tmp/trl-venv/bin/python | --skip-trl] [--json OUT]

TRL is not a bigft dependency: install it beside the project without touching its
environment, and name that interpreter with --trl-python:

    python -m venv --system-site-packages /tmp/trl-venv && /tmp/trl-venv/bin/pip install trl

Inputs, made deterministically (seed 0) in a temporary folder and removed at the end:
`--rows` alpaca rows (instruction / input / output; ~100 tokens each, so ~100M tokens at
the default million rows) of English-like text drawn from a Zipf-distributed synthetic
lexicon, the first quarter of them as a second file, and `--chat-rows` OpenAI `messages`
rows (optional system, user, assistant); a byte-level BPE tokenizer of 16,384 tokens
trained with `tokenizers` on the first 20,000 rows, wrapped as a transformers
`PreTrainedTokenizerFast` with a ChatML chat template; a 2-layer Llama (hidden 64) saved
with `save_pretrained` beside it.

Measured, every run a fresh process with its own empty HF_DATASETS_CACHE and prepared-data
folder: wall time, CPU time of the process tree (user + system, RUSAGE_CHILDREN: a figure
that contention on a shared machine changes less), the 1-minute load average before the
run, and, polled every 0.1 s from /proc/PID/smaps_rollup, the peak of the tree's summed
PSS (shared pages split between the processes mapping them, so forked workers are not
counted twice), of its anonymous part (heap, not memory-mapped Arrow files) and the
largest single process's RSS:

1. `python -m bigft data prepare CONFIG data.num_proc=N` (short prompt template, seq_len
   512, packing, no validation split): bigft's own preparation time (its `data: prepared
   into ... (N s)` line: load, UTF-8 check, format + tokenize, clean + deduplicate,
   packing plan, save_to_disk) and tokens/s on it, at N/4 and N rows;
2. the same rows through TRL (subprocess of --trl-python): `datasets.load_dataset("json")`
   of the rows as prompt / completion (the short template already rendered, "<s>" leading
   the prompt so the token ids are bigft's), then the construction of `SFTTrainer` with
   `SFTConfig(max_length=seq_len, packing=True, dataset_num_proc=N)` on the tiny model,
   which runs `SFTTrainer._prepare_dataset` (add eos, tokenize prompt and prompt +
   completion, build labels, bfd packing); its preparation time is load + `_prepare_dataset`
   (timed by wrapping it), its process time includes importing TRL and loading the model;
3. `python -m bigft train CONFIG` (2 steps of micro-batch 1) with the largest num_proc on
   the N rows: seconds from process start to the first logged step (its metrics.jsonl
   record, so step 1 itself is included), once on the preparation the `data prepare` run
   left (reused) and once from empty caches (prepared from scratch);
4. with --chat-rows, 1. and 2. (at that row count) on the chat rows: bigft's `chat`
   format against TRL's conversational prompt / completion.

On 2 busy CPU cores, --rows 20000 --chat-rows 5000 took ~6 minutes and --rows 200000
--chat-rows 50000 23 minutes; the default million rows (~100M tokens) took 35 minutes.

Prints markdown tables and the figures as JSON (also to --json). Figures go to
bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

RESULT_PREFIX = "RESULT "
VOCAB_SIZE = 16384
LEXICON = 30000
SAMPLE_ROWS = 20000  # rows the tokenizer is trained on
CHUNK_ROWS = 50000  # rows generated and written at a time
SHORT_WITH_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
SHORT_NO_INPUT = "### Instruction:\n{instruction}\n\n### Response:\n"
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
MiB = 2**20


# -- inputs ----------------------------------------------------------------------------------


def make_lexicon(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """LEXICON distinct pseudo-words of 1-4 syllables (some capitalized, some with a comma
    or full stop, a few numbers), shortest first, and their Zipf probabilities
    (rank + 2.7) ** -1.07."""
    onsets = [*"bcdfghjklmnprstvwz", "ch", "sh", "th", "st", "tr", "pl", "br", "gr", ""]
    vowels = ["a", "e", "i", "o", "u", "ea", "ou", "ai", "y"]
    codas = ["", "", "", "n", "r", "s", "t", "l", "nd", "st", "ng"]
    words: list[str] = []
    seen: set[str] = set()
    while len(words) < LEXICON:
        if rng.random() < 0.02:
            word = str(int(rng.integers(0, 10000)))
        else:
            word = "".join(
                onsets[rng.integers(len(onsets))]
                + vowels[rng.integers(len(vowels))]
                + codas[rng.integers(len(codas))]
                for _ in range(int(rng.choice([1, 2, 2, 3, 3, 4])))
            )
            draw = rng.random()
            if draw < 0.05:
                word = word.capitalize()
            elif draw < 0.10:
                word += ","
            elif draw < 0.14:
                word += "."
        if word not in seen:
            seen.add(word)
            words.append(word)
    words.sort(key=len)  # stable: the frequent words are the short ones, as in English
    weights = (np.arange(LEXICON) + 2.7) ** -1.07
    return np.asarray(words, dtype=object), weights / weights.sum()


class RowMaker:
    """Deterministic rows: row i of a given kind is the same whatever the chunking."""

    def __init__(self, seed: int = 0) -> None:
        self.lexicon, self.probs = make_lexicon(np.random.default_rng(seed))
        self.seed = seed

    def _texts(self, rng: np.random.Generator, lo: int, hi: int, n: int, p: float = 1.0) -> list:
        counts = rng.integers(lo, hi + 1, size=n) * (rng.random(n) < p)
        words = self.lexicon[rng.choice(LEXICON, size=int(counts.sum()), p=self.probs)].tolist()
        ends = np.cumsum(counts).tolist()
        starts = [0, *ends[:-1]]
        return [" ".join(words[a:b]).capitalize() for a, b in zip(starts, ends, strict=True)]

    def alpaca(self, start: int, n: int) -> list[dict[str, str]]:
        rng = np.random.default_rng([self.seed, 1, start])
        instructions = self._texts(rng, 6, 18, n)
        inputs = self._texts(rng, 5, 30, n, p=0.6)
        outputs = self._texts(rng, 16, 80, n)
        return [
            {"instruction": i, "input": x, "output": o}
            for i, x, o in zip(instructions, inputs, outputs, strict=True)
        ]

    def chat(self, start: int, n: int) -> list[dict[str, Any]]:
        rng = np.random.default_rng([self.seed, 2, start])
        systems = self._texts(rng, 5, 15, n, p=0.3)
        users = self._texts(rng, 10, 45, n)
        answers = self._texts(rng, 16, 80, n)
        rows = []
        for system, user, answer in zip(systems, users, answers, strict=True):
            head = [{"role": "system", "content": system}] if system else []
            rows.append(
                {
                    "messages": [
                        *head,
                        {"role": "user", "content": user},
                        {"role": "assistant", "content": answer},
                    ]
                }
            )
        return rows


def prompt_of(row: dict[str, str]) -> str:
    """bigft's 'short' alpaca prompt (bigft.data.formats.render_prompt)."""
    template = SHORT_WITH_INPUT if row["input"] else SHORT_NO_INPUT
    return template.replace("{instruction}", row["instruction"]).replace("{input}", row["input"])


def trl_alpaca(row: dict[str, str]) -> dict[str, str]:
    """TRL's prompt / completion form; "<s>" gives the bos bigft prepends."""
    return {"prompt": "<s>" + prompt_of(row), "completion": row["output"]}


def trl_chat(row: dict[str, Any]) -> dict[str, Any]:
    """TRL's conversational prompt / completion form (the last turn is the completion)."""
    return {"prompt": row["messages"][:-1], "completion": row["messages"][-1:]}


def write_rows(
    make: Any, convert: Any, n: int, paths: list[tuple[Path, Path, int]]
) -> list[dict[str, Any]]:
    """Write rows [0, n) to each (bigft file, TRL file, limit) pair, taking rows up to its
    limit; returns the first SAMPLE_ROWS rows."""
    handles = [(p.open("w"), q.open("w"), limit) for p, q, limit in paths]
    sample: list[dict[str, Any]] = []
    try:
        for start in range(0, n, CHUNK_ROWS):
            rows = make(start, min(CHUNK_ROWS, n - start))
            if len(sample) < SAMPLE_ROWS:
                sample.extend(rows[: SAMPLE_ROWS - len(sample)])
            lines = [json.dumps(r) + "\n" for r in rows]
            trl_lines = [json.dumps(convert(r)) + "\n" for r in rows]
            for fh, trl_fh, limit in handles:
                take = max(0, min(len(rows), limit - start))
                fh.writelines(lines[:take])
                trl_fh.writelines(trl_lines[:take])
    finally:
        for fh, trl_fh, _ in handles:
            fh.close()
            trl_fh.close()
    return sample


def build_tokenizer(texts: list[str]) -> Any:
    """Byte-level BPE of VOCAB_SIZE tokens trained on `texts`; ids 0-3 are bigft.tiny's
    pad / bos / eos / unk, then ChatML's <|im_start|> / <|im_end|>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from bigft.tiny import SPECIAL_TOKENS, wrap_tokenizer

    chatml = ["<|im_start|>", "<|im_end|>"]
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[*SPECIAL_TOKENS, *chatml],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    tokenizer = wrap_tokenizer(backend, add_bos_token=False)
    tokenizer.add_special_tokens({"additional_special_tokens": chatml})
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.model_max_length = 4096
    return tokenizer


def make_inputs(root: Path, rows: int, chat_rows: int, seq_len: int) -> dict[str, Any]:
    """The data files (bigft's and TRL's of each size) and the tokenizer + tiny model
    folder; returns their paths."""
    from bigft.tiny import build_tiny_llama

    maker = RowMaker(seed=0)
    small = max(rows // 4, 1)
    files: dict[str, Any] = {"sizes": {"alpaca": [small, rows]}}
    pairs = []
    for n in (small, rows):
        pairs.append((root / f"alpaca-{n}.jsonl", root / f"trl-alpaca-{n}.jsonl", n))
        files[f"alpaca-{n}"] = (pairs[-1][0], pairs[-1][1])
    sample = write_rows(maker.alpaca, trl_alpaca, rows, pairs)
    texts = [prompt_of(r) + r["output"] for r in sample]
    if chat_rows:
        chat = (root / f"chat-{chat_rows}.jsonl", root / f"trl-chat-{chat_rows}.jsonl")
        files[f"chat-{chat_rows}"] = chat
        chat_sample = write_rows(maker.chat, trl_chat, chat_rows, [(*chat, chat_rows)])
        texts += [m["content"] for r in chat_sample[: SAMPLE_ROWS // 4] for m in r["messages"]]
    tokenizer = build_tokenizer(texts)
    model_dir = root / "model"
    model = build_tiny_llama(len(tokenizer), max_positions=seq_len)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    files["model"] = model_dir
    return files


def write_config(path: Path, model_dir: Path, data: Path, fmt: str, seq_len: int) -> Path:
    import yaml

    data_cfg: dict[str, Any] = {
        "format": fmt,
        "train": str(data),
        "split": {"train": 1.0, "validation": 0.0, "test": 0.0},
        "packing": True,
        "cache": True,
    }
    if fmt == "alpaca":
        data_cfg["prompt_template"] = "short"
    config = {
        "model": {"name_or_path": str(model_dir)},
        "data": data_cfg,
        "train": {
            "seq_len": seq_len,
            "micro_batch_size": 1,
            "grad_accum": 1,
            "steps": 2,
            "precision": "fp32",
        },
        "checkpoint": {"export": False},
        "logging": {"progress_bar": False, "trackers": []},
        "output_dir": str(path.parent / "run"),
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


# -- measurement -----------------------------------------------------------------------------


def memory(pid: int) -> dict[str, int]:
    """Rss, Pss and Pss_Anon of a process, in bytes (/proc/PID/smaps_rollup, Linux)."""
    out = {}
    with open(f"/proc/{pid}/smaps_rollup") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            if key in ("Rss", "Pss", "Pss_Anon"):
                out[key] = int(value.split()[0]) * 1024
    return out


def run_tree(cmd: list[str], env: dict[str, str], log: Path) -> dict[str, Any]:
    """Run `cmd` to the end: its wall time, the CPU time of its tree (user + system, from
    RUSAGE_CHILDREN), the 1-minute load average before it, the epoch time it started at,
    and, polled every 0.1 s, the peak over time of the process tree's summed PSS (shared
    pages split between the processes that map them, so the sum is what the tree holds),
    of its anonymous part (the heap, not the memory-mapped Arrow files), and the largest
    single process's RSS."""
    import resource

    import psutil

    load = os.getloadavg()[0]
    cpu = resource.getrusage(resource.RUSAGE_CHILDREN)
    started_at = time.time()
    start = time.perf_counter()
    peak = peak_anon = peak_one = 0
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
        root = psutil.Process(proc.pid)
        while proc.poll() is None:
            total = anon = 0
            try:
                tree = [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                break
            for p in tree:
                try:
                    mem = memory(p.pid)
                except (OSError, ValueError):  # gone meanwhile
                    continue
                total += mem.get("Pss", 0)
                anon += mem.get("Pss_Anon", 0)
                peak_one = max(peak_one, mem.get("Rss", 0))
            peak, peak_anon = max(peak, total), max(peak_anon, anon)
            time.sleep(0.1)
        proc.wait()
    wall = time.perf_counter() - start
    used = resource.getrusage(resource.RUSAGE_CHILDREN)  # includes the tree's descendants
    text = log.read_text(errors="replace")
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {proc.returncode}):\n{text[-4000:]}")
    return {
        "wall_s": wall,
        "cpu_s": used.ru_utime + used.ru_stime - cpu.ru_utime - cpu.ru_stime,
        "load_before": load,
        "peak_pss_mib": peak / MiB,
        "peak_pss_anon_mib": peak_anon / MiB,
        "peak_rss_one_mib": peak_one / MiB,
        "started_at": started_at,
        "output": text,
    }


def bench_env(cache: Path, fresh: bool = True) -> dict[str, str]:
    """The environment of a measured process: its own datasets cache (emptied if `fresh`),
    no hub access, this checkout's bigft."""
    if fresh:
        shutil.rmtree(cache, ignore_errors=True)
    cache.mkdir(parents=True, exist_ok=True)
    return {
        **os.environ,
        "HF_DATASETS_CACHE": str(cache),
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }


def bigft_prepare(root: Path, config: Path, num_proc: int, label: str) -> dict[str, Any]:
    """`bigft data prepare` from empty caches; the folders stay for a later `bigft train`."""
    cache, store = root / f"hf-{label}", root / f"prepared-{label}"
    shutil.rmtree(store, ignore_errors=True)
    cmd = [sys.executable, "-m", "bigft", "data", "prepare", str(config)]
    cmd += [f"data.num_proc={num_proc}", f"data.prepared_dir={store}"]
    result = run_tree(cmd, bench_env(cache), root / f"{label}.log")
    found = re.search(r"data: prepared into \S+ \(([\d.]+) s\)", result.pop("output"))
    if found is None:
        raise RuntimeError(f"bigft data prepare: no 'prepared into' line in {label}.log")
    (stats_file,) = store.glob("*/stats.json")
    stats = json.loads(stats_file.read_text())
    train = stats["splits"]["train"]
    result.update(
        prepare_s=float(found.group(1)),
        rows=train["rows_loaded"],
        rows_kept=train["rows_kept"],
        tokens=train["tokens"],
        target_tokens=train["target_tokens"],
        packed_rows=stats["packed_rows"],
        cache=str(cache),
        store=str(store),
    )
    return result


def trl_prepare(
    root: Path, python: str, data: Path, model: Path, num_proc: int, seq_len: int, label: str
) -> dict[str, Any]:
    cache = root / f"hf-{label}"
    cmd = [python, __file__, "--trl-worker", "--data", str(data), "--model", str(model)]
    cmd += ["--num-proc", str(num_proc), "--seq-len", str(seq_len), "--out", str(root / label)]
    result = run_tree(cmd, bench_env(cache), root / f"{label}.log")
    lines = [x for x in result.pop("output").splitlines() if x.startswith(RESULT_PREFIX)]
    if not lines:
        raise RuntimeError(f"TRL worker printed no result; see {label}.log")
    result.update(json.loads(lines[-1].removeprefix(RESULT_PREFIX)))
    shutil.rmtree(cache, ignore_errors=True)
    shutil.rmtree(root / label, ignore_errors=True)
    return result


def trl_worker(args: argparse.Namespace) -> None:
    """In the TRL interpreter: load the rows and build an SFTTrainer, which prepares them."""
    start = time.perf_counter()
    import datasets
    import pyarrow.compute as pc
    import torch
    import transformers
    import trl
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    datasets.disable_progress_bars()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    ready = time.perf_counter()
    spent = {"prepare_dataset_s": 0.0}
    original = SFTTrainer._prepare_dataset

    def timed(self: Any, *a: Any, **k: Any) -> Any:
        begin = time.perf_counter()
        out = original(self, *a, **k)
        spent["prepare_dataset_s"] += time.perf_counter() - begin
        return out

    SFTTrainer._prepare_dataset = timed  # type: ignore[method-assign]
    begin = time.perf_counter()
    rows = datasets.load_dataset("json", data_files=str(args.data), split="train")
    loaded = time.perf_counter()
    config = SFTConfig(
        output_dir=str(args.out),
        max_length=args.seq_len,
        packing=True,
        dataset_num_proc=args.num_proc,
        per_device_train_batch_size=1,
        report_to="none",
        seed=0,
        use_cpu=True,
    )
    trainer = SFTTrainer(model=model, args=config, train_dataset=rows, processing_class=tokenizer)
    built = time.perf_counter()
    packed = trainer.train_dataset
    table = packed.with_format("arrow")[:]
    lengths = pc.list_value_length(table["input_ids"])
    targets = pc.sum(pc.not_equal(pc.list_flatten(table["labels"]), -100))
    result = {
        "rows": len(rows),
        "tokens": int(pc.sum(lengths).as_py()),
        "target_tokens": int(targets.as_py()),
        "packed_rows": len(packed),
        "load_s": loaded - begin,
        "prepare_dataset_s": spent["prepare_dataset_s"],
        "trainer_init_s": built - loaded,
        "prepare_s": loaded - begin + spent["prepare_dataset_s"],
        "startup_s": ready - start,
        "versions": {
            "trl": trl.__version__,
            "transformers": transformers.__version__,
            "datasets": datasets.__version__,
            "torch": torch.__version__,
        },
    }
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def first_step(
    root: Path, config: Path, num_proc: int, cache: Path, store: Path, reuse: bool, label: str
) -> dict[str, Any]:
    """`bigft train` for 2 steps, on the preparation in `store` (`reuse`) or from empty
    caches; seconds from its start to the first logged step (metrics.jsonl)."""
    out_dir = root / f"run-{label}"
    shutil.rmtree(out_dir, ignore_errors=True)
    if not reuse:
        shutil.rmtree(store, ignore_errors=True)
    cmd = [sys.executable, "-m", "bigft", "train", str(config), f"output_dir={out_dir}"]
    cmd += [f"data.num_proc={num_proc}", f"data.prepared_dir={store}"]
    result = run_tree(cmd, bench_env(cache, fresh=not reuse), root / f"{label}.log")
    output = result.pop("output")
    records = [json.loads(x) for x in (out_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r and "split" not in r]
    source = re.search(r"data: (\w+) (?:from|into) \S+ \(([\d.]+) s\)", output)
    result.update(
        first_step_s=steps[0]["time"] - result["started_at"],
        data=source.group(1) if source else "?",
        data_s=float(source.group(2)) if source else None,
    )
    shutil.rmtree(out_dir, ignore_errors=True)
    return result


# -- report ----------------------------------------------------------------------------------


def prep_table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| data | rows | num_proc | tool | target tokens | process s | CPU s | prepare s "
        "| tokens/s | peak PSS, tree (MiB) | of it anonymous (MiB) "
        "| largest process RSS (MiB) | load |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['format']} | {r['rows']:,} | {r['num_proc']} | {r['tool']} "
            f"| {r['target_tokens']:,} | {r['wall_s']:.1f} | {r['cpu_s']:.1f} "
            f"| {r['prepare_s']:.1f} "
            f"| {r['tokens'] / r['prepare_s']:,.0f} | {r['peak_pss_mib']:,.0f} "
            f"| {r['peak_pss_anon_mib']:,.0f} | {r['peak_rss_one_mib']:,.0f} "
            f"| {r['load_before']:.1f} |"
        )
    return "\n".join(lines)


def ratio_table(results: list[dict[str, Any]]) -> tuple[str, list[dict[str, Any]]]:
    lines = [
        "| data | rows | num_proc | bigft prepare s | TRL prepare s | TRL / bigft "
        "| bigft process s | TRL process s | TRL / bigft | bigft CPU s | TRL CPU s "
        "| TRL / bigft |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    ratios = []
    for b in (r for r in results if r["tool"] == "bigft"):
        key = (b["format"], b["rows"], b["num_proc"])
        t = next((r for r in results if r["tool"] == "trl" and key == _key(r)), None)
        if t is None:
            continue
        prep, proc = t["prepare_s"] / b["prepare_s"], t["wall_s"] / b["wall_s"]
        cpu = t["cpu_s"] / b["cpu_s"]
        ratios.append(dict(zip(("format", "rows", "num_proc"), key, strict=True)))
        ratios[-1].update(prepare_speedup=prep, process_speedup=proc, cpu_speedup=cpu)
        lines.append(
            f"| {b['format']} | {b['rows']:,} | {b['num_proc']} | {b['prepare_s']:.1f} "
            f"| {t['prepare_s']:.1f} | {prep:.2f}x | {b['wall_s']:.1f} | {t['wall_s']:.1f} "
            f"| {proc:.2f}x | {b['cpu_s']:.1f} | {t['cpu_s']:.1f} | {cpu:.2f}x |"
        )
    return "\n".join(lines), ratios


def _key(r: dict[str, Any]) -> tuple[str, int, int]:
    return r["format"], r["rows"], r["num_proc"]


def train_table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| prepared data | first step after (s) | bigft's data time (s) | process s "
        "| CPU s | peak PSS, tree (MiB) | load |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        data_s = "?" if r["data_s"] is None else f"{r['data_s']:.1f}"
        lines.append(
            f"| {r['label']} ({r['data']}) | {r['first_step_s']:.1f} | {data_s} "
            f"| {r['wall_s']:.1f} | {r['cpu_s']:.1f} | {r['peak_pss_mib']:,.0f} "
            f"| {r['load_before']:.1f} |"
        )
    return "\n".join(lines)


# -- main ------------------------------------------------------------------------------------


def bigft_versions() -> dict[str, str]:
    import datasets
    import tokenizers
    import torch
    import transformers

    from bigft import __version__

    return {
        "bigft": __version__,
        "transformers": transformers.__version__,
        "datasets": datasets.__version__,
        "tokenizers": tokenizers.__version__,
        "torch": torch.__version__,
    }


def trl_interpreter(args: argparse.Namespace) -> str | None:
    if args.skip_trl:
        return None
    if args.trl_python:
        return str(args.trl_python)
    probe = subprocess.run([sys.executable, "-c", "import trl"], capture_output=True)
    if probe.returncode == 0:
        return sys.executable
    sys.exit("TRL is not importable here: pass --trl-python (see the docstring) or --skip-trl")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="Alpaca rows (N).")
    parser.add_argument("--chat-rows", type=int, default=0, help="Chat rows (0: none).")
    parser.add_argument("--num-proc", default="1,2", help="data.num_proc values, comma-separated.")
    parser.add_argument("--seq-len", type=int, default=512, help="train.seq_len / max_length.")
    parser.add_argument("--trl-python", type=Path, help="Python interpreter that imports TRL.")
    parser.add_argument("--skip-trl", action="store_true", help="Measure bigft alone.")
    parser.add_argument("--skip-train", action="store_true", help="No `bigft train` runs.")
    parser.add_argument("--json", type=Path, help="Also write every figure to this file.")
    parser.add_argument("--trl-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.trl_worker:
        args.num_proc = int(args.num_proc)
        trl_worker(args)
        return

    num_procs = [int(x) for x in args.num_proc.split(",")]
    trl_python = trl_interpreter(args)
    begin = time.perf_counter()
    root = Path(tempfile.mkdtemp(prefix="bigft-dataprep-"))

    def note(text: str) -> None:
        print(f"[{time.perf_counter() - begin:6.0f} s] {text}", file=sys.stderr, flush=True)

    try:
        files = make_inputs(root, args.rows, args.chat_rows, args.seq_len)
        model = files["model"]
        note(f"inputs in {root}")
        jobs = [("alpaca", n) for n in files["sizes"]["alpaca"]]
        if args.chat_rows:
            jobs.append(("chat", args.chat_rows))
        results: list[dict[str, Any]] = []
        keep = ("alpaca", args.rows, max(num_procs))  # left for the `bigft train` runs
        for fmt, n in jobs:
            data, trl_data = files[f"{fmt}-{n}"]
            config = write_config(root / f"{fmt}-{n}.yaml", model, data, fmt, args.seq_len)
            for num_proc in num_procs:
                label = f"bigft-{fmt}-{n}-np{num_proc}"
                r = bigft_prepare(root, config, num_proc, label)
                r.update(tool="bigft", format=fmt, num_proc=num_proc, size=n)
                results.append(r)
                note(f"{label}: {r['wall_s']:.1f} s, prepared in {r['prepare_s']:.1f} s")
                if (fmt, n, num_proc) != keep:
                    shutil.rmtree(r["cache"], ignore_errors=True)
                    shutil.rmtree(r["store"], ignore_errors=True)
                if trl_python is None:
                    continue
                label = f"trl-{fmt}-{n}-np{num_proc}"
                r = trl_prepare(root, trl_python, trl_data, model, num_proc, args.seq_len, label)
                r.update(tool="trl", format=fmt, num_proc=num_proc, size=n)
                results.append(r)
                note(f"{label}: {r['wall_s']:.1f} s, prepared in {r['prepare_s']:.1f} s")

        trains: list[dict[str, Any]] = []
        if not args.skip_train:
            kept = next(r for r in results if (r["format"], r["size"], r["num_proc"]) == keep)
            config = root / f"alpaca-{args.rows}.yaml"
            for label, reuse in (("after `bigft data prepare`", True), ("none", False)):
                cache, store = Path(kept["cache"]), Path(kept["store"])
                tag = "reused" if reuse else "scratch"
                r = first_step(root, config, max(num_procs), cache, store, reuse, f"train-{tag}")
                r["label"] = label
                trains.append(r)
                note(f"train ({tag}): first step after {r['first_step_s']:.1f} s")

        versions = next((r["versions"] for r in results if "versions" in r), None)
        largest = [r for r in results if r["format"] == "alpaca" and r["tool"] == "bigft"][-1]
        peer = f"; TRL {versions['trl']}" if versions else ""
        print(
            f"{largest['rows']:,} alpaca rows ({largest['tokens'] / largest['rows']:.1f} tokens "
            f"a row, {largest['tokens']:,} tokens), byte-level BPE of {VOCAB_SIZE:,} tokens, "
            f"seq_len {args.seq_len}, packing; {os.cpu_count()} CPU cores{peer}\n"
        )
        print(prep_table(results) + "\n")
        ratios_md, ratios = ratio_table(results)
        if ratios:
            print("TRL's time over bigft's (above 1: bigft is faster)\n")
            print(ratios_md + "\n")
        if trains:
            print(
                f"`bigft train` (2 steps) on the {args.rows:,} rows, data.num_proc "
                f"{max(num_procs)}\n"
            )
            print(train_table(trains) + "\n")
        print(f"_total bench time: {time.perf_counter() - begin:.0f} s_")
        for r in results:
            r.pop("cache", None)
            r.pop("store", None)
        summary = {
            "args": {k: str(v) for k, v in vars(args).items()},
            "cpu_count": os.cpu_count(),
            "versions": {"trl side": versions, "bigft side": bigft_versions()},
            "prepare": results,
            "speedups": ratios,
            "train": trains,
        }
        print(json.dumps(summary, indent=2))
        if args.json:
            args.json.write_text(json.dumps(summary, indent=2))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
