"""Hostile inputs: every command, config key, data file, model directory and path a user
can get wrong must end in one line `error: ...` naming it, exit code 2, no traceback, and
nothing written.

Each row of CASES is one command line run in a fresh sandbox (tests/hostile.py): the
sandbox holds a valid config `run.yaml` (tests/assets/hostile/base.yaml, or the case's own
`config`), the data assets in `data/`, and whatever the case's `setup` adds. `<sb>` in an
argument is the sandbox, `<base>` the shared tiny model. Cases marked `real` run as
`python -m bigft` in a child process, to prove the real exit code and stderr.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.hostile import (
    HOSTILE,
    Outcome,
    Sandbox,
    Setup,
    changes,
    config_text,
    problems,
    run_in_process,
    run_real,
    sandbox_env,
    snapshot,
)

CONFIG = "<sb>/run.yaml"
ConfigSource = str | bytes | Callable[[Sandbox], bytes]


@dataclass(frozen=True)
class Case:
    """One hostile command line and the regex its error line must match."""

    id: str
    argv: tuple[str, ...]
    expect: str
    config: ConfigSource | None = None  # run.yaml; None: the valid base config
    setup: Setup | None = None
    real: bool = False  # run `python -m bigft` in a child process
    env: dict[str, str] = field(default_factory=dict)  # real runs only
    cwd: str = "."  # relative to the sandbox


def cfg(
    id: str, expect: str, edits: dict[str, object], *argv: str, drop: tuple[str, ...] = ()
) -> Case:
    """`bigft train run.yaml` where run.yaml is the base config with `edits` applied."""
    return Case(id, ("train", CONFIG, *argv), expect, config=config_text(edits, drop))


def raw(id: str, expect: str, config: str | ConfigSource, real: bool = False) -> Case:
    """`bigft train run.yaml` where run.yaml is exactly `config`: the name of a file in
    tests/assets/hostile/configs/, or bytes, or a function of the sandbox making bytes."""
    if isinstance(config, str):
        config = (HOSTILE / "configs" / config).read_text()
    return Case(id, ("train", CONFIG), expect, config=config, real=real)


def ovr(id: str, expect: str, *overrides: str, setup: Setup | None = None) -> Case:
    """`bigft train run.yaml OVERRIDES...` on the valid base config."""
    return Case(id, ("train", CONFIG, *overrides), expect, setup=setup)


def cmd(id: str, expect: str, *argv: str, **kw: object) -> Case:
    """Any command line."""
    return Case(id, argv, expect, **kw)  # type: ignore[arg-type]


def data(
    id: str, expect: str, train: str | list[str], setup: Setup | None = None, **edits: object
) -> Case:
    """`bigft train` with data.train (and other dotted `edits`, '__' for '.') changed."""
    changed = {"data.train": train, **{k.replace("__", "."): v for k, v in edits.items()}}
    return Case(id, ("train", CONFIG), expect, config=config_text(changed), setup=setup)


def model(id: str, expect: str, setup: Setup, path: str = "<sb>/model") -> Case:
    """`bigft train` on a model directory the case's setup breaks."""
    return Case(id, ("train", CONFIG, f"model.name_or_path={path}"), expect, setup=setup)


def encoded(text: str, encoding: str) -> Callable[[Sandbox], bytes]:
    """A config in another encoding (placeholders filled in before encoding)."""
    return lambda sb: sb.expand(text).encode(encoding)


# ---------------------------------------------------------------------------------------
# Setups.


def write(rel: str, content: str | bytes) -> Setup:
    return lambda sb: sb.write(rel, content)


def rows_bytes(encoding: str) -> bytes:
    rows = [{"instruction": "Répète.", "input": "café", "output": "café café"}] * 8
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode(encoding)


def broken_model(
    remove: tuple[str, ...] = (), replace: dict[str, bytes] | None = None, cut: str | None = None
) -> Setup:
    """A copy of the tiny model with files removed, replaced, or cut to half their size."""

    def setup(sb: Sandbox) -> None:
        path = sb.copy_model()
        for name in remove:
            (path / name).unlink()
        for name, content in (replace or {}).items():
            (path / name).write_bytes(content)
        if cut is not None:
            target = path / cut
            target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])

    return setup


def copied_model(sb: Sandbox) -> None:
    """An intact private copy of the tiny model (for commands that take a model path)."""
    sb.copy_model()


def edited_model_config(**values: object) -> Setup:
    def setup(sb: Sandbox) -> None:
        path = sb.copy_model()
        config = json.loads((path / "config.json").read_text())
        (path / "config.json").write_text(json.dumps({**config, **values}))

    return setup


def pickled_model(sb: Sandbox) -> None:
    """The model's weights as pytorch_model.bin only (a pickle)."""
    import torch
    from safetensors.torch import load_file

    path = sb.copy_model()
    weights = load_file(path / "model.safetensors")
    (path / "model.safetensors").unlink()
    torch.save(weights, path / "pytorch_model.bin")


def checkpoint(state: bytes | None = None, remove: tuple[str, ...] = ()) -> Setup:
    """A copy of the tiny run's checkpoint in <sb>/ckpt, its trainer_state.json replaced."""

    def setup(sb: Sandbox) -> None:
        (source,) = sorted((sb.run / "checkpoints").glob("step-*"))
        path = Path(shutil.copytree(source, sb.path("ckpt")))
        if state is not None:
            (path / "trainer_state.json").write_bytes(state)
        for name in remove:
            (path / name).unlink()

    return setup


def run_with_truncated_checkpoint(sb: Sandbox) -> None:
    """The tiny run, continued (train.resume auto) from a checkpoint cut short."""
    path = sb.copy_run()
    (state,) = path.glob("checkpoints/step-*/trainer_state.json")
    state.write_bytes(state.read_bytes()[:20])
    sb.write("run.yaml", config_text({"output_dir": str(path), "train.resume": "auto"}))


def run_copy(*extra: Setup) -> Setup:
    def setup(sb: Sandbox) -> None:
        sb.copy_run()
        for more in extra:
            more(sb)

    return setup


def scorer_module(name: str, source: str) -> Setup:
    return write(f"py/{name}.py", source)


def not_a_dataset(sb: Sandbox) -> None:
    sb.write("notds/readme.txt", "a folder of notes, not a saved dataset\n")
    sb.write("notds/state.json", '{"not": "arrow"}\n')


def dataset_dict_without_train(sb: Sandbox) -> None:
    import datasets

    rows = datasets.Dataset.from_list([{"instruction": "Up.", "input": "ab", "output": "AB"}] * 4)
    datasets.DatasetDict({"validation": rows}).save_to_disk(str(sb.path("dsdict")))


def two_runs(sb: Sandbox) -> None:
    sb.copy_run("run")
    sb.copy_run("run2")


def two_runs_one_binary(sb: Sandbox) -> None:
    sb.copy_run("run")
    other = sb.copy_run("run2")
    (other / "metrics.jsonl").write_bytes(bytes(range(256)) * 4)


def loop(sb: Sandbox) -> None:
    sb.symlink_loop("loop")


def frozen(sb: Sandbox) -> None:
    sb.freeze("ro")


def mkdir(rel: str) -> Setup:
    return lambda sb: sb.path(rel).mkdir()


def nothing(sb: Sandbox) -> None:
    """No setup: the path the case names does not exist."""


GOOD = "<sb>/data/good.jsonl"
TOO_LONG = "a" * 300
AFILE = write("afile", "just a file\n")
NOTES = write("notes/todo.txt", "buy milk\n")
LATIN1 = config_text({"data.prompt_template": "Réponds: {instruction}\n{input}\n"})

# fmt: off
CASES: list[Case] = [
    # -- config files: YAML syntax and structure -----------------------------------------------
    raw("yaml_tab_indent", r"run\.yaml:\d+", "tab_indent.yaml"),
    raw("yaml_unclosed_quote", r"run\.yaml:\d+", "unclosed_quote.yaml"),
    raw("yaml_duplicate_key", r"run\.yaml:\d+: optim\.lr", "duplicate_key.yaml"),
    raw("yaml_duplicate_section", r"run\.yaml:\d+: train", "duplicate_section.yaml"),
    raw("yaml_duplicate_output_dir", r"run\.yaml:\d+: output_dir",
        "duplicate_output_dir.yaml"),
    raw("yaml_duplicate_flow_key", r"run\.yaml:\d+: data\.split\.train",
        "duplicate_nested.yaml"),
    raw("yaml_top_level_list", r"run\.yaml.*top level", "top_list.yaml"),
    raw("yaml_top_level_scalar", r"run\.yaml.*top level", "top_scalar.yaml"),
    raw("yaml_comments_only", r"run\.yaml.*empty", "comments_only.yaml"),
    raw("yaml_blank_lines_only", r"run\.yaml.*empty", "blank_lines.yaml"),
    raw("yaml_two_documents", r"run\.yaml:\d+", "multi_document.yaml"),
    raw("yaml_python_tag", r"run\.yaml:\d+", "python_tag.yaml"),
    raw("yaml_section_is_list", r"run\.yaml:\d+: train", "section_is_list.yaml"),
    raw("yaml_nul_byte", r"run\.yaml:\d+",
        b"model:\n  name_or_path: x\x00y\ndata:\n  train: data/good.jsonl\noutput_dir: out\n"),
    raw("config_binary", r"run\.yaml", bytes(range(256)) * 4, real=True),
    raw("config_latin1", r"run\.yaml", encoded(LATIN1, "latin-1")),
    raw("config_utf16", r"run\.yaml", encoded(LATIN1, "utf-16")),
    cmd("config_is_directory", r"confdir", "train", "<sb>/confdir",
        setup=mkdir("confdir")),
    cmd("config_missing", r"missing\.yaml.*not found", "train", "<sb>/missing.yaml"),
    cmd("config_dev_null", r"/dev/null", "train", "/dev/null"),
    cmd("config_symlink_loop", r"loop", "train", "<sb>/loop",
        setup=loop),
    cmd("config_tilde_missing", r"no-such\.yaml.*not found", "train", "~/no-such.yaml"),
    cmd("config_show_binary", r"run\.yaml", "config", "show", CONFIG,
        config=b"\xff\xfe\x00\x01" * 64),
    # -- config files: unknown keys and wrong types --------------------------------------------
    cfg("unknown_top_key", r"run\.yaml:\d+: trian: unknown key.*'train'", {"trian": {"steps": 2}}),
    cfg("unknown_nested_key", r"run\.yaml:\d+: train\.stepz: unknown key.*'steps'",
        {"train.stepz": 2}),
    cfg("unknown_deep_key", r"run\.yaml:\d+: method\.lora\.rank: unknown key",
        {"method.name": "lora", "method.lora.rank": 8}),
    cfg("unknown_key_no_near_name", r"run\.yaml:\d+: data\.zzz: unknown key", {"data.zzz": 1}),
    cfg("lr_not_a_number", r"run\.yaml:\d+: optim\.lr", {"optim.lr": "fast"}),
    cfg("steps_float", r"run\.yaml:\d+: train\.steps", {"train.steps": 2.5}),
    cfg("steps_bool", r"run\.yaml:\d+: train\.steps", {"train.steps": True}),
    cfg("seq_len_list", r"run\.yaml:\d+: train\.seq_len", {"train.seq_len": [64]}),
    cfg("section_is_scalar", r"run\.yaml:\d+: train", {"train": 5}),
    cfg("section_is_string", r"run\.yaml:\d+: optim", {"optim": "adamw"}),
    cfg("model_name_int", r"run\.yaml:\d+: model\.name_or_path", {"model.name_or_path": 123}),
    cfg("model_name_empty", r"model\.name_or_path", {"model.name_or_path": ""}),
    cfg("data_train_mapping", r"run\.yaml:\d+: data\.train", {"data.train": {"a": 1}}),
    cfg("data_train_empty_string", r"data\.train", {"data.train": ""}),
    cfg("precision_unknown", r"run\.yaml:\d+: train\.precision", {"train.precision": "fp8"}),
    cfg("method_unknown", r"run\.yaml:\d+: method\.name", {"method.name": "lora2"}),
    cfg("output_dir_null", r"run\.yaml:\d+: output_dir", {"output_dir": None}),
    cfg("output_dir_empty", r"output_dir", {"output_dir": ""}),
    cfg("output_dir_number", r"run\.yaml:\d+: output_dir", {"output_dir": 5}),
    cfg("tracker_typo", r"run\.yaml:\d+: logging\.trackers.*'wandb'",
        {"logging.trackers": ["wandbb"]}),
    cfg("eval_metric_unknown", r"eval\.metric.*eval_acc", {"eval.metric": "eval_acc"}),
    cfg("hardware_gpu_unknown", r"run\.yaml:\d+: hardware\.gpu", {"hardware.gpu": "rtx9999"}),
    cfg("slurm_env_bad_name", r"run\.yaml:\d+: slurm\.env", {"slurm.env": {"1BAD": "x"}}),
    # -- config files: non-finite and out-of-range numbers -------------------------------------
    cfg("lr_inf", r"run\.yaml:\d+: optim\.lr", {"optim.lr": float("inf")}),
    cfg("lr_nan", r"run\.yaml:\d+: optim\.lr", {"optim.lr": float("nan")}),
    cfg("lr_nan_word", r"run\.yaml:\d+: optim\.lr", {"optim.lr": "nan"}),
    cfg("lr_1e400", r"run\.yaml:\d+: optim\.lr", {"optim.lr": "1e400"}),
    cfg("lr_negative_inf", r"run\.yaml:\d+: optim\.lr", {"optim.lr": float("-inf")}),
    cfg("lr_head_inf", r"run\.yaml:\d+: optim\.lr_head", {"optim.lr_head": float("inf")}),
    cfg("weight_decay_inf", r"run\.yaml:\d+: optim\.weight_decay",
        {"optim.weight_decay": float("inf")}),
    cfg("eps_inf", r"run\.yaml:\d+: optim\.eps", {"optim.eps": float("inf")}),
    cfg("max_grad_norm_inf", r"run\.yaml:\d+: train\.max_grad_norm",
        {"train.max_grad_norm": float("inf")}),
    cfg("betas_beta2_one", r"run\.yaml:\d+: optim\.betas", {"optim.betas": [0.9, 1.0]}),
    cfg("betas_negative", r"run\.yaml:\d+: optim\.betas", {"optim.betas": [-0.1, 0.999]}),
    cfg("betas_above_one", r"run\.yaml:\d+: optim\.betas", {"optim.betas": [1.5, 0.999]}),
    cfg("betas_nan", r"run\.yaml:\d+: optim\.betas", {"optim.betas": [float("nan"), 0.999]}),
    cfg("betas_three", r"run\.yaml:\d+: optim\.betas", {"optim.betas": [0.9, 0.99, 0.999]}),
    cfg("betas_scalar", r"run\.yaml:\d+: optim\.betas", {"optim.betas": 0.9}),
    cfg("epochs_inf", r"run\.yaml:\d+: train\.epochs", {"train.epochs": float("inf")},
        drop=("train.steps",)),
    cfg("seed_negative", r"run\.yaml:\d+: train\.seed", {"train.seed": -1}),
    cfg("seed_2_pow_64", r"run\.yaml:\d+: train\.seed", {"train.seed": 2**64}),
    cfg("seq_len_1e30", r"run\.yaml:\d+: train\.seq_len", {"train.seq_len": 10**30}),
    cfg("micro_batch_1e30", r"run\.yaml:\d+: train\.micro_batch_size",
        {"train.micro_batch_size": 10**30}),
    cfg("warmup_steps_beyond_steps", r"schedule\.warmup_steps",
        {"schedule.warmup_steps": 100}),
    cfg("keep_last_zero", r"run\.yaml:\d+: checkpoint\.keep_last", {"checkpoint.keep_last": 0}),
    cfg("lora_r_zero", r"run\.yaml:\d+: method\.lora\.r",
        {"method.name": "lora", "method.lora.r": 0}),
    cfg("lora_dropout_one", r"run\.yaml:\d+: method\.lora\.dropout",
        {"method.name": "lora", "method.lora.dropout": 1.0}),
    cfg("split_negative", r"run\.yaml:\d+: data\.split",
        {"data.split": {"train": 1.25, "validation": -0.25}}),
    cfg("slurm_signal_too_large", r"run\.yaml:\d+: slurm\.signal_seconds",
        {"slurm.signal_seconds": 70000}),
    cfg("slurm_time_number", r"run\.yaml:\d+: slurm\.time", {"slurm.time": 3600}),
    # -- config files: prompt template and scorer ----------------------------------------------
    cfg("prompt_template_unknown_field", r"data\.prompt_template.*foo",
        {"data.prompt_template": "{instruction} {foo}\n{input}\n"}),
    cfg("prompt_template_positional", r"data\.prompt_template",
        {"data.prompt_template": "{0}: {instruction}\n{input}\n"}),
    cfg("prompt_template_attribute", r"data\.prompt_template",
        {"data.prompt_template": "{instruction.upper}\n{input}\n"}),
    cfg("prompt_template_no_instruction", r"data\.prompt_template",
        {"data.prompt_template": "Answer:\n"}),
    cfg("scorer_not_module_function", r"eval\.scorer.*module:function",
        {"eval.generate.enabled": True, "eval.scorer": "json.dumps"}),
    cfg("scorer_empty_function", r"eval\.scorer",
        {"eval.generate.enabled": True, "eval.scorer": "json:"}),
    cfg("scorer_not_importable", r"eval\.scorer.*no_such_scorer_module",
        {"eval.generate.enabled": True, "eval.scorer": "no_such_scorer_module:score"}),
    cfg("scorer_missing_function", r"eval\.scorer.*nope",
        {"eval.generate.enabled": True, "eval.scorer": "json:nope"}),
    cfg("scorer_not_callable", r"eval\.scorer.*__doc__",
        {"eval.generate.enabled": True, "eval.scorer": "json:__doc__"}),
    cfg("scorer_takes_no_arguments", r"eval\.scorer.*getcwd",
        {"eval.generate.enabled": True, "eval.scorer": "os:getcwd"}),
    Case("scorer_takes_one_argument", ("train", CONFIG), r"eval\.scorer.*one_arg",
         config=config_text({"eval.generate.enabled": True, "eval.scorer": "one_arg:score"}),
         setup=scorer_module("one_arg", "def score(predictions):\n    return {}\n")),
    Case("scorer_import_raises", ("train", CONFIG), r"eval\.scorer.*raises_on_import",
         config=config_text({"eval.generate.enabled": True, "eval.scorer": "raises_on_import:f"}),
         setup=scorer_module("raises_on_import", "raise RuntimeError('boom')\n")),
    cfg("scorer_without_generate", r"eval\.scorer.*generate", {"eval.scorer": "json:dumps"}),
    # -- command-line overrides ----------------------------------------------------------------
    ovr("override_no_equals", r"optim\.lr.*key=value", "optim.lr"),
    ovr("override_empty_key", r"'=5'.*key=value", "=5"),
    ovr("override_double_dot", r"optim\.\.lr", "optim..lr=1e-4"),
    ovr("override_trailing_dot", r"optim\.=", "optim.=1e-4"),
    ovr("override_unknown_key", r"override optim\.lrr.*'lr'", "optim.lrr=1e-4"),
    ovr("override_unknown_section", r"override optimiser", "optimiser.lr=1e-4"),
    ovr("override_wrong_type", r"override train\.steps", "train.steps=many"),
    ovr("override_scalar_over_section", r"override train\b", "train=5"),
    ovr("override_null_section", r"override train\b", "train=null"),
    ovr("override_mapping_validated", r"train\.steps", "train={steps: 0}"),
    ovr("override_mapping_unknown_key", r"train\.stepz", "train={stepz: 3}"),
    ovr("override_into_scalar", r"output_dir.*not a section", "output_dir.sub=x"),
    ovr("override_lr_inf", r"override optim\.lr", "optim.lr=.inf"),
    ovr("override_lr_nan", r"override optim\.lr", "optim.lr=nan"),
    ovr("override_unparsable_value", r"override optim\.lr", "optim.lr=[1,"),
    ovr("override_seed_negative", r"override train\.seed", "train.seed=-1"),
    ovr("override_steps_bool", r"override train\.steps", "train.steps=true"),
    ovr("override_required_null", r"override model\.name_or_path", "model.name_or_path=null"),
    ovr("override_given_twice", r"optim\.lr",
        "optim.lr=1e-4", "optim.lr=2e-4"),
    ovr("override_line_break", r"override slurm\.partition", "slurm.partition=a\nb"),
    ovr("override_non_ascii_key", r"override optím", "optím.lr=1e-4"),
    ovr("override_model_tilde", r"no-such-model", "model.name_or_path=~/no-such-model"),
    ovr("override_data_tilde", r"no-such\.jsonl", "data.train=~/no-such.jsonl"),
    cmd("config_show_unknown_override", r"override optim\.lrr", "config", "show", CONFIG,
        "optim.lrr=1"),
    # -- data files ----------------------------------------------------------------------------
    data("data_validation_missing", r"no-such-val\.jsonl.*not found", "data/good.jsonl",
         data__validation="data/no-such-val.jsonl"),
    data("data_blank_lines", r"blank_lines\.jsonl.*no rows", "data/blank_lines.jsonl"),
    data("data_binary", r"binary\.jsonl", "data/binary.jsonl",
         write("data/binary.jsonl", bytes(range(256)) * 8)),
    data("data_latin1", r"latin1\.jsonl", "data/latin1.jsonl",
         write("data/latin1.jsonl", rows_bytes("latin-1"))),
    data("data_utf16", r"utf16\.jsonl", "data/utf16.jsonl",
         write("data/utf16.jsonl", rows_bytes("utf-16"))),
    data("data_invalid_utf8_in_string", r"bad_utf8\.jsonl:1\b", "data/bad_utf8.jsonl",
         write("data/bad_utf8.jsonl",
               b'{"instruction": "Up\xff.", "input": "ab", "output": "AB"}\n' * 8)),
    data("data_truncated_last_line", r"truncated\.jsonl:7: .*JSON", "data/truncated.jsonl"),
    data("data_json_not_objects", r"numbers\.json", "data/numbers.json"),
    data("data_jsonl_scalars", r"scalars\.jsonl:1: .*object", "data/scalars.jsonl"),
    data("data_wrong_fields", r"prompt_completion\.jsonl:1: .*'instruction'",
         "data/prompt_completion.jsonl"),
    data("data_output_not_string", r"output_number\.jsonl:1: .*'output'",
         "data/output_number.jsonl"),
    data("data_mixed_types", r"mixed_types\.jsonl(:6)?.*instruction", "data/mixed_types.jsonl"),
    data("data_sharegpt_unknown_role", r"sharegpt_robot\.jsonl:1: .*'robot'",
         "data/sharegpt_robot.jsonl", data__format="chat"),
    data("data_chat_role_not_string", r"chat_role_number\.jsonl:1: .*role",
         "data/chat_role_number.jsonl", data__format="chat"),
    data("data_chat_no_assistant", r"chat_no_assistant\.jsonl:1: .*assistant",
         "data/chat_no_assistant.jsonl", data__format="chat"),
    data("data_chat_messages_string", r"chat_messages_string\.jsonl:1: .*messages",
         "data/chat_messages_string.jsonl", data__format="chat"),
    data("data_all_rows_too_long", r"(long_text\.jsonl|train\.seq_len)",
         "data/long_text.jsonl", data__format="text", data__overlong="drop",
         train__seq_len=16),
    data("data_text_field_missing", r"long_text\.jsonl:1: .*'content'", "data/long_text.jsonl",
         data__format="text", data__text_field="content"),
    data("data_csv_without_column", r"no_column\.csv:2: .*'text'", "data/no_column.csv",
         data__format="text"),
    data("data_csv_header_only", r"header_only\.csv.*no rows", "data/header_only.csv"),
    data("data_parquet_garbage", r"garbage\.parquet", "data/garbage.parquet"),
    data("data_unsupported_suffix", r"train\.jsonl\.gz",
         "data/train.jsonl.gz"),
    data("data_dir_not_a_dataset", r"notds", "notds",
         not_a_dataset),
    data("data_empty_dir", r"emptyds", "emptyds",
         mkdir("emptyds")),
    data("data_dataset_dict_no_train", r"dsdict.*'train'", "dsdict",
         dataset_dict_without_train),
    data("data_list_one_missing", r"no-such-part\.jsonl.*not found",
         ["data/good.jsonl", "data/no-such-part.jsonl"]),  # type: ignore[arg-type]
    data("data_symlink_loop", r"loop", "loop", loop),
    data("data_regression_nan_label", r"regression_nan\.jsonl:8: .*'score'",
         "data/regression_nan.jsonl", task="regression", data__label_field="score",
         data__format="text"),
    data("data_single_class", r"one_class\.jsonl",
         "data/one_class.jsonl", task="classification", data__format="text"),
    # -- model directories ---------------------------------------------------------------------
    model("model_missing", r"no-such-model.*not found", nothing, "<sb>/no-such-model"),
    model("model_is_a_file", r"afile", AFILE, "<sb>/afile"),
    model("model_empty_dir", r"empty-model", mkdir("empty-model"),
          "<sb>/empty-model"),
    model("model_no_config_json", r"config\.json", broken_model(remove=("config.json",))),
    model("model_broken_config_json", r"config\.json",
          broken_model(replace={"config.json": b"{not json"})),
    model("model_config_json_list", r"config\.json", broken_model(replace={"config.json": b"[]"})),
    model("model_unknown_model_type", r"no-such-arch",
          edited_model_config(model_type="no-such-arch")),
    model("model_vocab_mismatch", r"(vocab_size|model\.safetensors|embed_tokens)",
          edited_model_config(vocab_size=7)),
    model("model_zero_byte_safetensors", r"model\.safetensors",
          broken_model(replace={"model.safetensors": b""})),
    model("model_truncated_safetensors", r"model\.safetensors",
          broken_model(cut="model.safetensors")),
    model("model_garbage_safetensors", r"model\.safetensors",
          broken_model(replace={"model.safetensors": bytes(range(256)) * 64})),
    model("model_no_weights", r"(weights|safetensors)",
          broken_model(remove=("model.safetensors",))),
    model("model_pickle_only", r"(allow_pickle|pytorch_model\.bin)", pickled_model),
    model("model_no_tokenizer_files", r"tokenizer",
          broken_model(remove=("tokenizer.json", "tokenizer_config.json"))),
    model("model_broken_tokenizer_json", r"tokenizer",
          broken_model(replace={"tokenizer.json": b"{"})),
    model("model_symlink_loop", r"loop", loop, "<sb>/loop"),
    Case("model_tokenizer_missing", ("train", CONFIG, "model.tokenizer=<sb>/no-such-tok"),
         r"no-such-tok"),
    Case("distill_teacher_missing", ("train", CONFIG, "distill.teacher=<sb>/no-such-teacher"),
         r"no-such-teacher"),
    Case("distill_teacher_no_config", ("train", CONFIG, "distill.teacher=<sb>/model"),
         r"(teacher|config\.json)", setup=broken_model(remove=("config.json",))),
    # -- checkpoints for resume ----------------------------------------------------------------
    ovr("resume_missing_dir", r"train\.resume.*no-such-ckpt", "train.resume=<sb>/no-such-ckpt"),
    Case("resume_is_a_file", ("train", CONFIG, "train.resume=<sb>/afile"), r"train\.resume",
         setup=AFILE),
    ovr("resume_typo", r"train\.resume.*nevr", "train.resume=nevr"),
    Case("resume_truncated_state", ("train", CONFIG, "train.resume=<sb>/ckpt"),
         r"trainer_state\.json", setup=checkpoint(state=b'{"step": 2, "sched')),
    Case("resume_state_is_list", ("train", CONFIG, "train.resume=<sb>/ckpt"),
         r"trainer_state\.json", setup=checkpoint(state=b"[]")),
    Case("resume_state_binary", ("train", CONFIG, "train.resume=<sb>/ckpt"),
         r"trainer_state\.json", setup=checkpoint(state=bytes(range(256)))),
    Case("resume_weights_missing", ("train", CONFIG, "train.resume=<sb>/ckpt"),
         r"ckpt",
         setup=checkpoint(remove=("model.safetensors",))),
    Case("resume_auto_truncated_state", ("train", CONFIG), r"trainer_state\.json",
         setup=run_with_truncated_checkpoint),
    # -- bigft launch (always --dry-run: nothing is started) -----------------------------------
    cmd("launch_nproc_zero", r"--nproc", "launch", CONFIG, "--dry-run", "--nproc", "0",
        real=True),
    cmd("launch_nproc_negative", r"--nproc", "launch", CONFIG, "--dry-run", "--nproc", "-3"),
    cmd("launch_nproc_not_int", r"--nproc", "launch", CONFIG, "--dry-run", "--nproc", "abc"),
    cmd("launch_node_rank_too_big", r"--node-rank", "launch", CONFIG, "--dry-run",
        "--nnodes", "2", "--node-rank", "2"),
    cmd("launch_node_rank_negative", r"--node-rank", "launch", CONFIG, "--dry-run",
        "--nnodes", "2", "--node-rank", "-1"),
    cmd("launch_nnodes_zero", r"--nnodes", "launch", CONFIG, "--dry-run", "--nnodes", "0"),
    cmd("launch_master_port_too_big", r"--master-port", "launch", CONFIG, "--dry-run",
        "--nnodes", "2", "--master-port", "70000"),
    cmd("launch_bad_config", r"run\.yaml:\d+: optim\.lr", "launch", CONFIG, "--dry-run",
        config=config_text({"optim.lr": -1})),
    cmd("launch_env_slurm_nnodes", r"SLURM_NNODES", "launch", CONFIG, "--dry-run", real=True,
        env={"SLURM_NNODES": "abc"}),
    # -- bigft plan ----------------------------------------------------------------------------
    cmd("plan_gpu_mem_nan", r"--gpu-mem", "plan", "--model", "llama-3.1-8b", "--gpu-mem", "nan",
        real=True),
    cmd("plan_gpu_mem_negative", r"--gpu-mem", "plan", "--model", "llama-3.1-8b",
        "--gpu-mem", "-1"),
    cmd("plan_gpu_mem_inf", r"--gpu-mem", "plan", "--model", "llama-3.1-8b", "--gpu-mem", "inf"),
    cmd("plan_lora_rank_zero", r"--lora-rank", "plan", "--model", "llama-3.1-8b",
        "--method", "lora", "--lora-rank", "0"),
    cmd("plan_lora_rank_negative", r"--lora-rank", "plan", "--model", "llama-3.1-8b",
        "--method", "lora", "--lora-rank", "-8"),
    cmd("plan_seq_len_zero", r"(--seq-len|seq_len)", "plan", "--model", "llama-3.1-8b",
        "--seq-len", "0"),
    cmd("plan_micro_batch_zero", r"(--micro-batch|micro_batch)", "plan", "--model", "llama-3.1-8b",
        "--micro-batch", "0"),
    cmd("plan_global_batch_zero", r"--global-batch", "plan", "--model", "llama-3.1-8b",
        "--global-batch", "0"),
    cmd("plan_nodes_zero", r"--nodes", "plan", "--model", "llama-3.1-8b", "--nodes", "0"),
    cmd("plan_gpus_per_node_zero", r"--gpus-per-node", "plan", "--model", "llama-3.1-8b",
        "--gpus-per-node", "0"),
    cmd("plan_margin_above_one", r"--margin", "plan", "--model", "llama-3.1-8b",
        "--margin", "1.5"),
    cmd("plan_margin_nan", r"--margin", "plan", "--model", "llama-3.1-8b", "--margin", "nan"),
    cmd("plan_cpu_mem_negative", r"--cpu-mem", "plan", "--model", "llama-3.1-8b",
        "--cpu-mem", "-1"),
    cmd("plan_unknown_model", r"llama-99b", "plan", "--model", "llama-99b"),
    cmd("plan_unknown_method", r"lorax", "plan", "--model", "llama-3.1-8b", "--method", "lorax"),
    cmd("plan_unknown_strategy", r"zero4", "plan", "--model", "llama-3.1-8b",
        "--strategy", "zero4"),
    cmd("plan_unknown_gpu", r"rtx9999", "plan", "--model", "llama-3.1-8b", "--gpu", "rtx9999"),
    cmd("plan_gpu_and_gpu_mem", r"--gpu.*--gpu-mem", "plan", "--model", "llama-3.1-8b",
        "--gpu", "h100-80", "--gpu-mem", "80"),
    cmd("plan_nothing_to_plan", r"(--model|CONFIG)", "plan"),
    cmd("plan_model_dir_broken", r"config\.json", "plan", "--model", "<sb>/model",
        setup=broken_model(replace={"config.json": b"{not json"})),
    # -- bigft slurm ---------------------------------------------------------------------------
    cmd("slurm_render_mem_abc", r"--mem", "slurm", "render", CONFIG, "--mem", "abc", real=True),
    cmd("slurm_render_mem_negative", r"--mem", "slurm", "render", CONFIG, "--mem", "-5G"),
    cmd("slurm_render_nodes_zero", r"--nodes", "slurm", "render", CONFIG, "--nodes", "0"),
    cmd("slurm_render_gpus_negative", r"--gpus-per-node", "slurm", "render", CONFIG,
        "--gpus-per-node", "-1"),
    cmd("slurm_render_time_word", r"--time", "slurm", "render", CONFIG, "--time", "forever"),
    cmd("slurm_render_job_name_newline", r"--job-name", "slurm", "render", CONFIG,
        "--job-name", "a\nb"),
    cmd("slurm_render_grid_flag", r"--grid", "slurm", "render", CONFIG,
        "--grid", "output_dir=a,b"),
    cmd("slurm_render_signal_beyond_time", r"slurm\.signal_seconds", "slurm", "render", CONFIG,
        config=config_text({"slurm.time": "00:01:00"})),
    cmd("slurm_render_accelerate_config_missing", r"slurm\.accelerate_config.*nope",
        "slurm", "render", CONFIG,
        config=config_text({"slurm.launcher": "accelerate",
                            "slurm.accelerate_config": "nope.yaml"})),
    cmd("slurm_render_output_dir_is_file", r"afile", "slurm", "render", CONFIG,
        "output_dir=<sb>/afile", setup=AFILE),
    cmd("slurm_sweep_grid_output_dir", r"--grid output_dir", "slurm", "sweep", CONFIG,
        "--dry-run", "--grid", "output_dir=a,b"),
    cmd("slurm_sweep_grid_duplicate_values", r"--grid.*optim\.lr",
        "slurm", "sweep", CONFIG, "--dry-run", "--grid", "optim.lr=1e-4,1e-4"),
    cmd("slurm_sweep_grid_duplicate_keys", r"--grid.*optim\.lr",
        "slurm", "sweep", CONFIG, "--dry-run", "--grid", "optim.lr=1e-4",
        "--grid", "optim.lr=2e-4"),
    cmd("slurm_sweep_grid_no_values", r"--grid optim\.lr", "slurm", "sweep", CONFIG,
        "--dry-run", "--grid", "optim.lr=,"),
    cmd("slurm_sweep_grid_unknown_key", r"optim\.lrr", "slurm", "sweep", CONFIG,
        "--dry-run", "--grid", "optim.lrr=1,2"),
    cmd("slurm_sweep_grid_bad_value", r"train\.steps", "slurm", "sweep", CONFIG,
        "--dry-run", "--grid", "train.steps=2,0"),
    cmd("slurm_sweep_max_parallel_zero", r"--max-parallel", "slurm", "sweep", CONFIG,
        "--dry-run", "--grid", "optim.lr=1e-4,2e-4", "--max-parallel", "0"),
    cmd("slurm_status_missing_run", r"no-such-run", "slurm", "status", "<sb>/no-such-run"),
    cmd("slurm_status_broken_job_json", r"job\.json", "slurm", "status", "<sb>/run",
        setup=run_copy(write("run/slurm/job.json", "{"))),
    cmd("slurm_sweep_status_not_a_sweep", r"sweep", "slurm", "sweep-status", "<sb>/run",
        setup=run_copy()),
    # -- bigft export --------------------------------------------------------------------------
    cmd("export_out_is_the_run", r"--out", "export", "<sb>/run", "--out", "<sb>/run",
        setup=run_copy()),
    cmd("export_out_is_a_file", r"--out.*afile", "export", "<sb>/run", "--out", "<sb>/afile",
        setup=run_copy(AFILE), real=True),
    cmd("export_out_dot_holds_run", r"--out \.", "export", "<sb>/run", "--out", ".",
        setup=run_copy()),
    cmd("export_out_dot_inside_run", r"--out \.", "export", ".", "--out", ".",
        setup=run_copy(), cwd="run"),
    cmd("export_out_is_final", r"--out", "export", "<sb>/run", "--out", "<sb>/run/final",
        setup=run_copy()),
    cmd("export_out_symlink_loop", r"--out.*loop", "export", "<sb>/run", "--out", "<sb>/loop",
        setup=run_copy(loop)),
    cmd("export_out_under_a_file", r"--out.*afile", "export", "<sb>/run",
        "--out", "<sb>/afile/export", setup=run_copy(AFILE)),
    cmd("export_out_readonly", r"--out.*ro", "export", "<sb>/run", "--out", "<sb>/ro/export",
        setup=run_copy(frozen)),
    cmd("export_out_name_too_long", r"--out", "export", "<sb>/run", "--out", f"<sb>/{TOO_LONG}",
        setup=run_copy()),
    cmd("export_out_home", r"--out", "export", "<sb>/run", "--out", "~", setup=run_copy()),
    cmd("export_run_missing", r"no-such-run", "export", "<sb>/no-such-run", "--out", "<sb>/exp"),
    cmd("export_run_not_a_run", r"notes", "export", "<sb>/notes", "--out", "<sb>/exp",
        setup=NOTES),
    # -- bigft eval ----------------------------------------------------------------------------
    cmd("eval_missing_target", r"no-such-dir", "eval", "<sb>/no-such-dir", "--data", GOOD),
    cmd("eval_non_model_dir", r"notes", "eval", "<sb>/notes", "--data", GOOD,
        setup=NOTES),
    cmd("eval_target_is_file", r"afile", "eval", "<sb>/afile", "--data", GOOD, setup=AFILE),
    cmd("eval_model_without_data", r"--data", "eval", "<sb>/model", setup=copied_model),
    cmd("eval_model_data_missing", r"no-such\.jsonl", "eval", "<sb>/model",
        "--data", "<sb>/no-such.jsonl", setup=copied_model),
    cmd("eval_model_task_unknown", r"--task.*sentiment", "eval", "<sb>/model", "--data", GOOD,
        "--task", "sentiment", setup=copied_model),
    cmd("eval_model_bad_override", r"override optim\.lrr", "eval", "<sb>/model", "--data", GOOD,
        "optim.lrr=1", setup=copied_model),
    cmd("eval_run_without_final", r"final", "eval", "<sb>/run",
        setup=run_copy(lambda sb: shutil.rmtree(sb.path("run/final")))),
    cmd("eval_run_data_missing", r"no-such\.jsonl", "eval", "<sb>/run",
        "--data", "<sb>/no-such.jsonl", setup=run_copy()),
    # -- bigft report / compare ----------------------------------------------------------------
    cmd("report_missing_dir", r"no-such-run", "report", "<sb>/no-such-run"),
    cmd("report_target_is_file", r"afile", "report", "<sb>/afile", setup=AFILE),
    cmd("report_not_a_run", r"notes.*metrics\.jsonl", "report", "<sb>/notes",
        setup=NOTES),
    cmd("report_metrics_binary", r"metrics\.jsonl", "report", "<sb>/run",
        setup=run_copy(write("run/metrics.jsonl", bytes(range(256)) * 4))),
    cmd("report_config_broken", r"config\.yaml", "report", "<sb>/run",
        setup=run_copy(write("run/config.yaml", "train: [steps\n"))),
    cmd("report_out_is_file", r"afile", "report", "<sb>/run", "--out", "<sb>/afile",
        setup=run_copy(AFILE)),
    cmd("compare_missing_dirs", r"no-such-a", "compare", "<sb>/no-such-a", "<sb>/no-such-b"),
    cmd("compare_one_dir", r"two", "compare", "<sb>/run", setup=run_copy()),
    cmd("compare_unknown_metric", r"no_such_metric", "compare", "<sb>/run", "<sb>/run2",
        "--metric", "no_such_metric", setup=two_runs),
    cmd("compare_metrics_binary", r"run2.*metrics\.jsonl", "compare", "<sb>/run", "<sb>/run2",
        setup=two_runs_one_binary),
    # -- bigft data preview / demo -------------------------------------------------------------
    cmd("preview_num_negative", r"--num", "data", "preview", CONFIG, "--num", "-1"),
    cmd("preview_data_missing", r"no-such\.jsonl", "data", "preview", CONFIG,
        "data.train=<sb>/no-such.jsonl"),
    cmd("demo_bad_override", r"override optim\.lrr", "demo", "-o", "<sb>/demo", "optim.lrr=1"),
    cmd("demo_output_is_file", r"afile", "demo", "-o", "<sb>/afile", setup=AFILE),
    cmd("demo_output_holds_notes", r"notes", "demo", "-o", "<sb>/notes",
        setup=NOTES),
    # -- the file system -----------------------------------------------------------------------
    ovr("fs_output_dir_readonly", r"output_dir.*ro", "output_dir=<sb>/ro", setup=frozen),
    ovr("fs_output_dir_readonly_parent", r"output_dir.*ro", "output_dir=<sb>/ro/run",
        setup=frozen),
    ovr("fs_output_dir_is_file", r"output_dir.*afile", "output_dir=<sb>/afile", setup=AFILE),
    ovr("fs_output_dir_symlink_loop", r"output_dir.*loop", "output_dir=<sb>/loop", setup=loop),
    ovr("fs_output_dir_through_loop", r"output_dir.*loop", "output_dir=<sb>/loop/run",
        setup=loop),
    ovr("fs_output_dir_name_300_chars", r"output_dir", f"output_dir=<sb>/{TOO_LONG}"),
    ovr("fs_output_dir_under_file", r"output_dir.*afile", "output_dir=<sb>/afile/run",
        setup=AFILE),
    ovr("fs_output_dir_dev_null", r"output_dir.*/dev/null", "output_dir=/dev/null"),
    ovr("fs_output_dir_in_proc", r"output_dir.*/proc/", "output_dir=/proc/bigft-out"),
    ovr("fs_output_dir_tilde_under_file", r"output_dir", "output_dir=~/afile/run",
        setup=write("home/afile", "x\n")),
]
# fmt: on


def test_corpus_size() -> None:
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids)), "case ids must be unique"
    assert len(CASES) >= 130
    assert sum(c.real for c in CASES) >= 5


def test_harness_sees_a_run_that_went_ahead(tmp_path: Path) -> None:
    """A command that succeeds and writes its outputs is reported as such."""
    before = snapshot(tmp_path)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "config.yaml").write_text("x: 1\n")
    found = problems(Outcome(0, "", "done\n"), "out", changes(before, snapshot(tmp_path)))
    assert found == ["exit 0", "not an error line (done)", "wrote out, wrote out/config.yaml"]


def test_base_config_is_valid(tiny_base: Path, tmp_path: Path) -> None:
    """The cases break a config that is valid as shipped: `config show` accepts it."""
    sb = Sandbox(tmp_path, tiny_base)
    shutil.copytree(HOSTILE / "data", sb.path("data"))
    sb.write("run.yaml", config_text())
    result = run_in_process(["config", "show", str(sb.path("run.yaml"))])
    assert result.exit_code == 0 and result.crash is None, result.stderr


@pytest.fixture(scope="module")
def tiny_run(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 2-step run of the base config with a checkpoint and a final model."""
    root = tmp_path_factory.mktemp("hostile-run")
    sb = Sandbox(root, tiny_base)
    shutil.copytree(HOSTILE / "data", sb.path("data"))
    out = root / "run"
    sb.write(
        "run.yaml",
        config_text({"output_dir": str(out), "checkpoint": {"every_steps": 2, "export": True}}),
    )
    result = run_in_process(["train", str(sb.path("run.yaml"))])
    assert result.exit_code == 0 and result.crash is None, result.stderr + str(result.crash)
    return out


@pytest.fixture(scope="module", autouse=True)
def _libraries_imported() -> None:
    """Import the heavy libraries before any case moves HOME: they fix their cache
    locations from it on import."""
    import datasets  # noqa: F401
    import huggingface_hub  # noqa: F401
    import transformers  # noqa: F401


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_input(
    case: Case, tiny_base: Path, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    sb = Sandbox(tmp_path / "sb", tiny_base, lambda: request.getfixturevalue("tiny_run"))
    sb.root.mkdir()
    shutil.copytree(HOSTILE / "data", sb.path("data"))
    source = config_text() if case.config is None else case.config
    sb.write("run.yaml", source(sb) if callable(source) else source)
    try:
        if case.setup is not None:
            case.setup(sb)
        argv = [sb.expand(arg) for arg in case.argv]
        with sandbox_env(sb, sb.path(case.cwd)) as child_env:
            before = snapshot(sb.root)
            if case.real:
                outcome = run_real(argv, {**child_env, **case.env}, sb.path(case.cwd))
            else:
                outcome = run_in_process(argv)
            written = changes(before, snapshot(sb.root))
    finally:
        sb.thaw()
    found = problems(outcome, case.expect, written)
    assert not found, f"{case.id}: " + "; ".join(found)
