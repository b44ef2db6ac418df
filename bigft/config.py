"""Typed configuration: YAML for users, validated pydantic models inside.

Every section forbids unknown keys; a typo fails with the nearest valid name and the
line it sits on, and so does a key written twice. Numbers are finite and within range,
paths are ones a file system can hold, with `~` expanded. `key=value` overrides from the
command line use dotted paths and are converted to the declared type; a `{key: value}`
mapping merges into the section it names. This module must not import torch (`bigft
--help` and `bigft config show` stay fast).
"""

from __future__ import annotations

import difflib
import os
import re
import string
import types
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from bigft.errors import ConfigError

# Counts and sizes end up in tensors, numpy arrays and C libraries, none of which holds
# an integer past int64; Python's own ints would carry 10**30 to the first of them.
INT64_MAX = 2**63 - 1


def _numeric(annotation: Any) -> bool:
    """Whether a field holds a number (int / float, maybe optional) and not a bool."""
    if get_origin(annotation) in (Union, types.UnionType):
        members = set(get_args(annotation))
    else:
        members = {annotation}
    return bool(members & {int, float}) and bool not in members


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, values are re-validated,
    numbers are finite (no .inf / .nan) and integers fit in int64."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        # pydantic reads `steps: yes` as 1; a boolean where a number belongs is a mistake.
        field = cls.model_fields.get(info.field_name or "")
        if isinstance(value, bool) and field is not None and _numeric(field.annotation):
            raise ValueError("expected a number, not true/false")
        return value

    @field_validator("*", mode="after")
    @classmethod
    def _fits_int64(cls, value: Any) -> Any:
        for item in value if isinstance(value, list | tuple) else [value]:
            if isinstance(item, int) and not isinstance(item, bool) and abs(item) > INT64_MAX:
                raise ValueError(f"must be at most {INT64_MAX} (a 64-bit integer)")
        return value


def _usable_path(value: str) -> str:
    """A path the operating system can open: not empty, no NUL byte, no component over
    255 bytes (the limit of ext4, XFS, Btrfs, APFS...), under Linux's PATH_MAX in all.
    `~` is expanded later, when paths resolve."""
    if not value.strip():
        raise ValueError("is empty")
    if "\0" in value:
        raise ValueError("contains a NUL character")
    expanded = os.path.expanduser(value)
    for part in Path(expanded).parts:
        size = len(part.encode("utf-8", "surrogateescape"))
        if size > 255:
            raise ValueError(
                f"the path component '{part[:24]}...' is {size} bytes long; file systems "
                "allow at most 255 per name"
            )
    size = len(expanded.encode("utf-8", "surrogateescape"))
    if size >= 4096:
        raise ValueError(f"the path is {size} bytes long; the limit (PATH_MAX) is 4095")
    return value


# A file or directory path (or hub id) given in the config.
PathStr = Annotated[str, AfterValidator(_usable_path)]

NAMED_PROMPTS = ("alpaca", "short")
PROMPT_FIELDS = ("instruction", "input")


def prompt_fields(template: str) -> set[str]:
    """The placeholders of a custom data.prompt_template; ValueError when it has one that
    is not {instruction} / {input}, or is not a well-formed format string."""
    escape = "write a literal brace as {{ or }}"
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ValueError(f"malformed template: {str(exc).lower()} ({escape})") from None
    found = set()
    for _, name, spec, conversion in parts:
        if name is None:
            continue
        if name not in PROMPT_FIELDS:
            raise ValueError(
                f"unknown placeholder {{{name}}}; the placeholders are {{instruction}} and "
                f"{{input}} ({escape})"
            )
        if spec or conversion:
            raise ValueError(f"write the placeholder as plain {{{name}}} (no ':' or '!')")
        found.add(name)
    return found


class ModelConfig(Section):
    """Which pretrained model to fine-tune and how to load it."""

    name_or_path: PathStr = Field(
        description="Local directory saved with save_pretrained, or a hub id (needs network)."
    )
    tokenizer: PathStr | None = Field(
        None, description="Tokenizer directory or hub id; defaults to model.name_or_path."
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit).")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="Dtype of the loaded weights. 'auto': under bf16/fp16 mixed precision, "
        "frozen weights in that dtype and trained ones in float32 (full fine-tuning: "
        "float32 master weights; lora/dora: a bf16 base, fp32 adapters; freeze: bf16 "
        "frozen layers, fp32 trained ones; qlora: method.quant.compute_dtype for what is "
        "not 4-bit); float32 with train.precision fp32. An explicit dtype loads every "
        "weight in it (float32 restores fp32 frozen weights).",
    )
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = Field(
        "auto",
        description="'auto': flash_attention_2 when the architecture supports it, "
        "flash-attn imports and a GPU is present; else sdpa where the architecture supports "
        "it; else eager (e.g. Gemma-2). The start-up summary says which. An explicit value "
        "the architecture does not support is an error.",
    )
    trust_remote_code: bool = Field(
        False,
        description="Run modelling code shipped with the checkpoint. Off unless you trust it.",
    )
    allow_pickle: bool = Field(
        False,
        description="Also load weights stored as pickles (pytorch_model.bin) from the model "
        "and from checkpoints. Unpickling can run code hidden in the file: convert to "
        "safetensors instead (load and save_pretrained once, where you trust the file).",
    )


class SplitConfig(Section):
    """Ratios for a deterministic train/validation/test split of data.train."""

    train: float = Field(0.9, ge=0, le=1, description="Fraction of rows for training.")
    validation: float = Field(0.1, ge=0, le=1, description="Fraction for validation.")
    test: float = Field(0.0, ge=0, le=1, description="Fraction held out for the final test.")

    @model_validator(mode="after")
    def _sum_to_one(self) -> SplitConfig:
        total = self.train + self.validation + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(
                f"split ratios must sum to 1 (train {self.train} + validation "
                f"{self.validation} + test {self.test} = {total:g})"
            )
        if self.train <= 0:
            raise ValueError("split.train must be > 0")
        return self


class TrainSource(Section):
    """One source of a training mixture: an entry of data.train written as a mapping."""

    path: PathStr = Field(description="The source's file, directory or 'hub:NAME'.")
    name: str | None = Field(
        None, description="Name in the summary and metrics; default: the file's stem."
    )
    format: Literal["text", "alpaca", "chat"] | None = Field(
        None, description="Row format of this source; default: data.format."
    )
    text_field: str | None = Field(
        None, description="format text: this source's text column; default: data.text_field."
    )
    weight: float | None = Field(
        None,
        gt=0,
        description="Share of each training epoch drawn from this source (weights are "
        "normalised over the sources; an epoch holds as many rows as all sources together). "
        "A source smaller than its share is repeated, a larger one sampled without "
        "replacement (seeded by train.seed).",
    )
    epochs: float | None = Field(
        None,
        gt=0,
        description="Times this source's rows appear in each training epoch (2: every row "
        "twice; 0.5: a seeded half); default 1. Not with weight.",
    )

    @model_validator(mode="after")
    def _weight_or_epochs(self) -> TrainSource:
        if self.weight is not None and self.epochs is not None:
            raise ValueError("give a source a weight or an epoch count, not both")
        return self

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        return Path(self.path.removeprefix("hub:")).stem or self.path


class ImageAugmentConfig(Section):
    """Random changes to each training image, drawn anew every epoch from train.seed, the
    epoch and the row (so a resumed run sees the images an uninterrupted one saw). Applied
    before the model's image processor; validation and test images are never changed."""

    random_resized_crop: tuple[float, float] | None = Field(
        None,
        description="Crop a random area of the image, this share of it (min, max), e.g. "
        "[0.6, 1.0], with an aspect ratio between 3/4 and 4/3, resized back to the image's "
        "size; null: off.",
    )
    horizontal_flip: float = Field(
        0.0, ge=0, le=1, description="Probability of mirroring left-right."
    )
    vertical_flip: float = Field(
        0.0, ge=0, le=1, description="Probability of mirroring upside down."
    )
    rotation: float = Field(
        0.0, ge=0, le=180, description="Rotate by a uniform angle in [-rotation, rotation] degrees."
    )
    color_jitter: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="Scale brightness, contrast and saturation each by a uniform factor in "
        "[1 - x, 1 + x].",
    )

    @field_validator("random_resized_crop")
    @classmethod
    def _crop_share(cls, value: tuple[float, float] | None) -> tuple[float, float] | None:
        if value is not None and not 0 < value[0] <= value[1] <= 1:
            raise ValueError("write [min, max] shares of the image with 0 < min <= max <= 1")
        return value


class BackTranslationConfig(Section):
    """Paraphrases through two local translation models (e.g. MarianMT directories):
    source language -> pivot language -> source language, greedy decoding, on the CPU of
    the preparing process. One paraphrase per text: further copies of a row made by
    back-translation equal the first and are skipped."""

    forward: PathStr = Field(
        description="Local seq2seq model directory (model + tokenizer, save_pretrained) "
        "translating into the pivot language; relative paths follow the config-path rule."
    )
    backward: PathStr = Field(
        description="Local seq2seq model directory translating back from the pivot language."
    )
    max_new_tokens: int = Field(128, gt=0, description="Longest translation generated.")
    batch_size: int = Field(16, gt=0, description="Texts translated at once.")


class TextAugmentConfig(Section):
    """EDA changes to training texts (Wei & Zou 2019, "EDA: Easy Data Augmentation
    Techniques"), and back-translation. Each training row gains up to `copies` augmented
    rows, each made by one technique drawn among those enabled (a rate > 0, or
    back_translation set). What changes: the text field (format text), instruction and
    input (alpaca), user turns (chat), text_field and text_pair_field (classification,
    regression); responses and labels never. Validation and test rows are never changed.
    Deterministic for train.seed and row, and prepared (and cached) with the rest of the
    data; not with data.streaming."""

    copies: int = Field(
        1,
        ge=1,
        le=64,
        description="Augmented copies of each training row; a copy equal to its row or to "
        "an earlier copy is skipped.",
    )
    synonym_replacement: float = Field(
        0.0,
        ge=0,
        le=1,
        description="Replace this share of a text's words (rounded, at least one) by a "
        "synonym; 0: off.",
    )
    random_insertion: float = Field(
        0.0,
        ge=0,
        le=1,
        description="Insert this share of a text's word count (rounded, at least one) of "
        "synonyms of its words, at random places; 0: off.",
    )
    random_swap: float = Field(
        0.0,
        ge=0,
        le=1,
        description="Swap two random words, this share of the word count times (rounded, at "
        "least once); 0: off.",
    )
    random_deletion: float = Field(
        0.0,
        ge=0,
        le=1,
        description="Delete each word with this probability (never every word); 0: off.",
    )
    synonyms: PathStr | None = Field(
        None,
        description="Synonyms: a .json file {word: [synonym, ...]}, or a text file with one "
        "group of interchangeable words per line (comma-separated, or whitespace-separated "
        "when a line has no comma); 'wordnet' reads NLTK's WordNet (pip install "
        "'bigft[nlp]', then python -m nltk.downloader wordnet). Needed by "
        "synonym_replacement and random_insertion.",
    )
    back_translation: BackTranslationConfig | None = Field(
        None, description="Paraphrase through two translation models; null: off."
    )

    @model_validator(mode="after")
    def _has_synonyms(self) -> TextAugmentConfig:
        rates = [self.synonym_replacement, self.random_insertion]
        if (
            not any([*rates, self.random_swap, self.random_deletion])
            and self.back_translation is None
        ):
            raise ValueError(
                "enables no technique: set a rate (synonym_replacement, random_insertion, "
                "random_swap, random_deletion) above 0 or back_translation, or write "
                "text: null"
            )
        if (self.synonym_replacement or self.random_insertion) and self.synonyms is None:
            raise ValueError(
                "synonym_replacement / random_insertion need data.augment.text.synonyms "
                "(a synonyms file, or 'wordnet')"
            )
        return self


class AugmentConfig(Section):
    """Train-time augmentation, of images (task image_classification, contrastive) or of
    texts (task causal_lm, classification, regression)."""

    image: ImageAugmentConfig | None = Field(None, description="Image augmentation; null: off.")
    text: TextAugmentConfig | None = Field(None, description="Text augmentation; null: off.")


class DataConfig(Section):
    """Where the data is, what shape its rows have, and how they become training rows."""

    format: Literal["text", "alpaca", "chat"] = Field(
        "alpaca",
        description="text: continued pre-training on a text field; alpaca: "
        "instruction/input/output rows; chat: OpenAI `messages` or ShareGPT `conversations`.",
    )
    train: PathStr | list[PathStr | TrainSource] = Field(
        description="Training data: .jsonl/.json/.csv/.parquet file(s), a directory saved "
        "with Dataset.save_to_disk, or 'hub:NAME' (needs network). Relative paths resolve "
        "against the config file's directory (against the working directory when given on "
        "the command line). A list entry may be a mapping {path, name, "
        "format, text_field, weight | epochs}: a mixture of sources, each with its own "
        "format and share of every epoch."
    )
    validation: PathStr | None = Field(
        None, description="Separate validation file; when absent, split from data.train."
    )
    test: PathStr | None = Field(None, description="Separate test file; when absent, split.")
    split: SplitConfig = Field(
        default_factory=SplitConfig,
        description="Ratios used for the splits that have no separate file.",
    )
    text_field: str = Field("text", description="Column holding the text (format: text).")
    prompt_template: str = Field(
        "alpaca",
        description="Alpaca prompt: 'alpaca' (the Stanford Alpaca preamble), 'short' "
        "(### Instruction / ### Response only), or a custom string with {instruction} and "
        "optionally {input}; a literal brace is written {{ or }}.",
    )
    chat_template: str | None = Field(
        None,
        description="Jinja chat template overriding the tokenizer's; when neither exists a "
        "built-in template is used.",
    )
    completion_only: bool = Field(
        True,
        description="Train only on responses (prompt and user tokens get label -100). "
        "Ignored for format: text.",
    )
    drop_duplicates: bool = Field(True, description="Drop exact duplicate rows.")
    overlong: Literal["truncate", "drop"] = Field(
        "truncate", description="Rows longer than train.seq_len: cut them, or drop them."
    )
    near_duplicates: float | None = Field(
        None,
        gt=0,
        le=1,
        description="Drop near-duplicate rows: a Jaccard similarity threshold in (0, 1], e.g. "
        "0.85, between two rows' sets of token 3-grams (prompt and response), estimated by "
        "MinHash LSH; 3-grams found in a tenth or more of the train rows (template, system "
        "prompt) are ignored. Kept-first in split order train, validation, test, so a "
        "validation/test row resembling a train row leaves validation/test, never train. "
        "null: off. Needs pip install 'bigft[clean]'. task causal_lm.",
    )
    min_tokens: int = Field(
        0,
        ge=0,
        description="Drop rows of fewer tokens than this (the whole row, before truncation) as "
        "too_short. task causal_lm.",
    )
    languages: list[str] | None = Field(
        None,
        description="Keep only rows in these languages (ISO 639-1 codes: en, de, fr, ...): a "
        "row whose trained-on text (its target tokens, decoded) fastText's language model "
        "(shipped in the package, offline) assigns to another language with probability "
        "0.5 or more is dropped; text too short to tell stays. null: off. Needs pip install "
        "'bigft[clean]'. task causal_lm.",
    )

    @field_validator("languages")
    @classmethod
    def _language_codes(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return None
        if not value:
            raise ValueError("lists no language; use null to keep every language")
        codes = [code.strip().lower() for code in value]
        bad = [code for code in codes if not re.fullmatch(r"[a-z]{2,3}", code)]
        if bad:
            raise ValueError(f"{bad[0]!r} is not a language code; use ISO 639-1: en, de, fr, ...")
        return codes

    packing: bool = Field(
        True,
        description="Pack several rows into each seq_len row with per-sequence position_ids "
        "(no attention across sequences); false pads each micro-batch instead. task "
        "causal_lm only: labelled rows are always padded.",
    )
    num_proc: int = Field(1, ge=1, description="Processes for tokenization (datasets.map).")
    cache: bool = Field(
        True,
        description="Keep the prepared data (tokenized, masked, cleaned, split) and reuse it "
        "when nothing it depends on changed, and reuse the datasets library's tokenization "
        "cache; false prepares in memory every time and writes nothing.",
    )
    prepared_dir: PathStr | None = Field(
        None,
        description="Folder of prepared datasets, one sub-folder per fingerprint (`bigft "
        "data prepare`); null: bigft-prepared/ in the datasets library's cache "
        "(HF_DATASETS_CACHE). On a cluster, a shared filesystem lets one process of the "
        "job prepare while the others wait.",
    )
    streaming: bool = Field(
        False,
        description="Read data.train as a stream (datasets IterableDataset): formatted, "
        "tokenized and packed on the fly, for corpora larger than memory or disk. Needs "
        "train.steps; rows are shuffled and packed within windows of 1,024; exact "
        "duplicates are kept; validation and test come from data.validation / data.test "
        "only (no split of the stream).",
    )
    shuffle: bool = Field(True, description="Shuffle training rows each epoch (seeded).")
    loader_workers: int | None = Field(
        None,
        ge=0,
        description="Worker processes per training process that read and collate batches "
        "ahead of the step (torchdata StatefulDataLoader), with pinned memory on a GPU; "
        "null: 2 with a GPU, 0 (in the training process) without one.",
    )
    loader_prefetch: int = Field(
        2, ge=1, description="Batches each loader worker prepares ahead (with workers)."
    )
    label_field: str = Field(
        "label", description="task classification/regression: column holding the label."
    )
    text_pair_field: str | None = Field(
        None,
        description="task classification/regression: optional second text column, encoded "
        "as a pair with text_field (e.g. premise / hypothesis).",
    )
    label_names: list[str] | None = Field(
        None,
        description="task classification / image_classification: the classes, in id order; "
        "default: the sorted distinct labels of the training rows (the sub-folder names of "
        "an image folder). Integer labels index this list. task contrastive: the classes "
        "zero-shot accuracy is measured over.",
    )
    image_field: str = Field(
        "image",
        description="task image_classification / contrastive: column holding the image (a "
        "file path, relative to the data file's folder, or an image of a saved dataset).",
    )
    augment: AugmentConfig = Field(
        default_factory=AugmentConfig, description="Train-time augmentation (training split only)."
    )

    @field_validator("train")
    @classmethod
    def _non_empty(cls, value: str | list[str | TrainSource]) -> str | list[str | TrainSource]:
        if isinstance(value, list) and not value:
            raise ValueError("data.train lists no files")
        if isinstance(value, list):
            sources = [TrainSource(path=v) if isinstance(v, str) else v for v in value]
            weighted = [s.weight is not None for s in sources]
            if any(weighted) and not all(weighted):
                raise ValueError(
                    "some sources have a weight and others not: give every source a weight "
                    "(shares of an epoch), or use epochs"
                )
            labels = [s.label for s in sources]
            twice = sorted({n for n in labels if labels.count(n) > 1})
            if twice and len(sources) > 1 and any(isinstance(v, TrainSource) for v in value):
                raise ValueError(f"two sources are named {twice[0]!r}: give them distinct `name`s")
        return value

    @field_validator("prompt_template")
    @classmethod
    def _known_placeholders(cls, value: str) -> str:
        # Rendering fills only {instruction} and {input}: anything else would stay in
        # every prompt verbatim.
        if value not in NAMED_PROMPTS:
            prompt_fields(value)
        return value

    @model_validator(mode="after")
    def _template_has_instruction(self) -> DataConfig:
        template = self.prompt_template
        if self.format != "alpaca" or template in NAMED_PROMPTS:
            return self
        if "instruction" not in prompt_fields(template):
            close = difflib.get_close_matches(template, NAMED_PROMPTS, n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise ValueError(
                f"data.prompt_template: {hint}a custom template needs an {{instruction}} "
                "placeholder (and optionally {input}); or use 'alpaca' or 'short'"
            )
        return self

    @property
    def train_sources(self) -> list[TrainSource]:
        """data.train as sources (a plain path is a source with the defaults)."""
        entries = [self.train] if isinstance(self.train, str) else self.train
        return [TrainSource(path=e) if isinstance(e, str) else e for e in entries]

    @property
    def train_files(self) -> list[str]:
        return [source.path for source in self.train_sources]

    @property
    def is_mixture(self) -> bool:
        """Whether some source has its own weight or epoch count."""
        return any(s.weight is not None or s.epochs is not None for s in self.train_sources)


class LoraConfig(Section):
    """Low-rank adapters (peft) for method lora, dora and qlora."""

    r: int = Field(16, gt=0, description="Adapter rank.")
    alpha: int = Field(32, gt=0, description="Scale numerator: update = alpha/r x B·A.")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the adapter input.")
    target_modules: Literal["all-linear"] | list[str] = Field(
        "all-linear",
        description="'all-linear': every linear layer but the head; or module names such "
        "as [q_proj, v_proj].",
    )
    modules_to_save: list[str] = Field(
        default_factory=list,
        description="Modules trained in full beside the adapters and saved with them, e.g. "
        "[embed_tokens, lm_head] after adding tokens.",
    )
    use_rslora: bool = Field(
        False, description="rsLoRA: scale by alpha/sqrt(r) instead of alpha/r (stable at high r)."
    )

    @field_validator("target_modules")
    @classmethod
    def _some_targets(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and not value:
            raise ValueError("lists no modules; use 'all-linear' or module names")
        return value


class QuantConfig(Section):
    """4-bit base weights (bitsandbytes) for method qlora."""

    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type.")
    double_quant: bool = Field(
        True, description="Quantize the quantization constants too (~0.4 bit/param saved)."
    )
    compute_dtype: Literal["bfloat16", "float16", "float32"] = Field(
        "bfloat16", description="Dtype the dequantized weights are multiplied in."
    )
    quant_storage: Literal["uint8", "bfloat16", "float16", "float32"] = Field(
        "uint8",
        description="Element type holding the packed 4-bit values. FSDP2/ZeRO-3 shard only "
        "float tensors of one dtype: set it to the model dtype there.",
    )


class MethodConfig(Section):
    """What is trained: the whole model, part of it, or adapters on a (4-bit) frozen base."""

    name: Literal["full", "freeze", "lora", "dora", "qlora"] = Field(
        "full",
        description="full: every parameter; freeze: full minus the parts frozen below; "
        "lora / dora: peft adapters on a frozen base; qlora: LoRA on a 4-bit base.",
    )
    lora: LoraConfig = Field(
        default_factory=LoraConfig, description="Adapter settings (lora, dora, qlora)."
    )
    quant: QuantConfig = Field(
        default_factory=QuantConfig, description="4-bit quantization settings (qlora)."
    )
    freeze_embeddings: bool = Field(False, description="freeze: do not train the input embeddings.")
    freeze_first_layers: int = Field(
        0, ge=0, description="freeze: do not train the first N decoder layers."
    )
    train_top_layers: int | None = Field(
        None,
        ge=0,
        description="freeze: train only the top N decoder layers, the final norm and the "
        "head; 0 trains the head only.",
    )
    gradient_checkpointing: Literal["off", "full", "every_k"] = Field(
        "off",
        description="Recompute activations in backward (non-reentrant): every decoder layer "
        "(full) or every k-th (every_k).",
    )
    checkpoint_every_k: int | None = Field(
        None, ge=1, description="every_k: checkpoint decoder layers 0, k, 2k, ..."
    )
    offload_activations: bool = Field(
        False,
        description="Keep checkpointed layer inputs in pinned host memory and bring them back "
        "for backward, the copies overlapping compute on CUDA (torch's saved-tensor hooks); "
        "needs gradient_checkpointing full or every_k.",
    )
    tiled_mlp: bool = Field(
        False,
        description="Run each decoder layer's MLP over the sequence in tiles, each tile's "
        "intermediates recomputed in backward: at long sequences the MLP's activations "
        "(3 x tokens x intermediate_size) stop dominating a layer's peak.",
    )
    tiled_mlp_shards: int | None = Field(
        None,
        ge=1,
        description="tiled_mlp: tiles per sequence; null: ceil(tokens / hidden_size), "
        "as ALST does.",
    )

    @model_validator(mode="after")
    def _consistent(self) -> MethodConfig:
        adapters = self.name in ("lora", "dora", "qlora")
        freezing = (
            self.freeze_embeddings
            or self.freeze_first_layers
            or (self.train_top_layers is not None)
        )
        if self.name == "freeze" and not freezing:
            raise ValueError(
                "method.name freeze needs freeze_embeddings, freeze_first_layers or "
                "train_top_layers"
            )
        if freezing and self.name != "freeze":
            hint = "the base is already frozen" if adapters else "use method.name: freeze"
            raise ValueError(f"freeze_* / train_top_layers apply to method freeze ({hint})")
        if self.freeze_first_layers and self.train_top_layers is not None:
            raise ValueError("set freeze_first_layers or train_top_layers, not both")
        # Non-default values only: the resolved config written to a run lists every field.
        if self.lora != LoraConfig() and not adapters:
            raise ValueError(f"method.lora is set but method.name is {self.name}")
        if self.quant != QuantConfig() and self.name != "qlora":
            raise ValueError(f"method.quant is set but method.name is {self.name}, not qlora")
        if self.gradient_checkpointing == "every_k" and self.checkpoint_every_k is None:
            raise ValueError("gradient_checkpointing every_k needs checkpoint_every_k")
        if self.checkpoint_every_k is not None and self.gradient_checkpointing != "every_k":
            raise ValueError("checkpoint_every_k applies to gradient_checkpointing: every_k")
        if self.offload_activations and self.gradient_checkpointing == "off":
            raise ValueError("offload_activations needs gradient_checkpointing full or every_k")
        if self.tiled_mlp_shards is not None and not self.tiled_mlp:
            raise ValueError("tiled_mlp_shards applies to tiled_mlp: true")
        return self


class OptimConfig(Section):
    """Optimizer settings, with optional per-depth and per-part learning rates."""

    name: Literal["adamw", "adamw_8bit", "paged_adamw_8bit", "adafactor", "sgd"] = Field(
        "adamw",
        description="adamw (torch); adamw_8bit / paged_adamw_8bit (bitsandbytes: 8-bit "
        "states, paged to host memory on GPU spikes); adafactor (factored second moment, "
        "torch); sgd (with momentum).",
    )
    momentum: float = Field(0.9, ge=0, lt=1, description="sgd: momentum.")
    layer_decay: float | None = Field(
        None,
        gt=0,
        le=1,
        description="Layer-wise lr decay: decoder layer i of L trains at lr x decay^(L-i); "
        "head and final norm at lr, embeddings at lr x decay^(L+1).",
    )
    lr_adapters: float | None = Field(
        None, gt=0, description="Base lr of adapter weights (then scaled by layer_decay)."
    )
    lr_head: float | None = Field(None, gt=0, description="lr of the output head (as is).")
    lr_embeddings: float | None = Field(
        None, gt=0, description="lr of the input embeddings (as is)."
    )
    lr: float = Field(2e-5, gt=0, description="Peak learning rate.")
    weight_decay: float = Field(
        0.0, ge=0, description="Decoupled weight decay (never applied to biases and norms)."
    )
    betas: tuple[float, float] = Field(
        (0.9, 0.999), description="Adam betas (first and second moment decay), each in [0, 1)."
    )
    eps: float = Field(1e-8, gt=0, description="Adam epsilon.")

    @field_validator("betas")
    @classmethod
    def _betas_in_range(cls, value: tuple[float, float]) -> tuple[float, float]:
        # beta = 1 never forgets the first gradient; beta > 1 or < 0 diverges.
        for i, beta in enumerate(value):
            if not 0 <= beta < 1:
                raise ValueError(f"betas[{i}] = {beta} is outside [0, 1)")
        return value


class ScheduleConfig(Section):
    """Learning-rate schedule: warmup, then decay."""

    name: Literal["linear", "cosine", "constant"] = Field(
        "cosine", description="Decay after warmup."
    )
    warmup_steps: int | None = Field(
        None, ge=0, description="Warmup optimizer steps; overrides warmup_ratio."
    )
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="Warmup as a fraction of steps.")
    min_lr_ratio: float = Field(
        0.0, ge=0, le=1, description="Cosine: final lr as a fraction of the peak."
    )


class TrainConfig(Section):
    """The loop: length, batch, precision, seed, clipping, resume."""

    steps: int | None = Field(
        None, gt=0, description="Optimizer steps; when unset, run train.epochs."
    )
    epochs: float = Field(1.0, gt=0, description="Epochs over the training rows (if no steps).")
    seq_len: int = Field(
        2048,
        gt=0,
        description="Tokens per training row; bigft refuses a value above the model's "
        "max_position_embeddings (with rope scaling, as its config.json states).",
    )
    micro_batch_size: int | Literal["auto"] = Field(
        1, description="Rows per device per forward pass; 'auto' asks the memory planner."
    )
    grad_accum: int | None = Field(
        None,
        gt=0,
        description="Micro-batches per optimizer step; derived from "
        "global_batch_size when unset (default 1).",
    )
    global_batch_size: int | None = Field(
        None, gt=0, description="Rows per optimizer step over all devices."
    )
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="Mixed precision; 'auto' is bf16 on GPUs that support it, else fp32."
    )
    seed: int = Field(
        42,
        ge=0,
        lt=2**32,
        description="Seed for initialization, shuffling and dropout; 0 to 2**32 - 1 (what "
        "numpy accepts).",
    )
    max_grad_norm: float | None = Field(
        1.0, gt=0, description="Clip the global gradient norm; null disables clipping."
    )
    resume: PathStr = Field(
        "auto",
        description="'auto': continue from the latest checkpoint in output_dir if any; "
        "'never'; or a checkpoint directory.",
    )
    log_every: int = Field(1, gt=0, description="Log metrics every N optimizer steps.")
    nonfinite: Literal["skip", "stop"] = Field(
        "skip",
        description="A step whose gradient norm (with clipping; without it, the loss or any "
        "gradient) is NaN/inf on any process: 'skip' "
        "leaves weights and optimizer state as they were (the data and the lr schedule move "
        "on); 'stop' checkpoints that unchanged state and exits with an error (code 3).",
    )
    max_skipped: int | None = Field(
        10,
        ge=0,
        description="nonfinite skip: stop as 'stop' does once more than this many steps of "
        "the run were skipped; null: never.",
    )
    loss_impl: Literal["auto", "chunked", "full", "liger"] = Field(
        "auto",
        description="Causal-LM loss: 'chunked' computes lm_head + cross-entropy inside the "
        "lm_head call loss_chunk tokens at a time, never holding the B x L x vocab logits; "
        "'full' materialises them; 'liger' uses liger-kernel's fused kernel (CUDA, pip "
        "install liger-kernel); 'auto' is chunked unless the model rescales or caps its "
        "logits (Gemma-2 softcapping, Cohere, Granite) or its lm_head is not a plain "
        "Linear, then full (summary.json says which and why).",
    )
    loss_chunk: int = Field(
        256,
        gt=0,
        description="loss_impl chunked: token positions per chunk. 256 keeps a chunk's "
        "logits (bf16 + fp32 copy + fp32 gradient) at ~0.33 GB for Llama-3's 128,256-token "
        "vocabulary, against ~5 GB at 4,096 tokens unchunked; larger chunks do fewer, "
        "bigger matmuls.",
    )

    compile: bool = Field(
        False,
        description="torch.compile each decoder layer (the first steps are slower while it "
        "compiles; the planner assumes no memory change).",
    )
    tf32: bool = Field(
        True,
        description="fp32 runs on Ampere or newer GPUs: TF32 matmuls and convolutions "
        "(torch.backends float32 precision 'high'); false keeps full fp32.",
    )

    @field_validator("micro_batch_size")
    @classmethod
    def _positive_batch(cls, value: int | str) -> int | str:
        if isinstance(value, int) and value <= 0:
            raise ValueError("must be a positive integer or 'auto'")
        return value


class ParallelConfig(Section):
    """How the work is spread over processes: DDP, DeepSpeed ZeRO or FSDP2."""

    strategy: Literal["ddp", "zero1", "zero2", "zero3", "fsdp2"] = Field(
        "ddp",
        description="ddp: full replicas; zero1/2/3: DeepSpeed ZeRO sharding of optimizer "
        "states / +gradients / +parameters; fsdp2: PyTorch fully_shard per decoder layer.",
    )
    offload_optimizer: bool = Field(
        False,
        description="ZeRO / FSDP2: keep optimizer states (and the update) on CPU. Under "
        "ZeRO, optim adamw then steps with DeepSpeed's CPU Adam (a C++ op compiled on "
        "first use, about a minute, cached in ~/.cache/torch_extensions).",
    )
    offload_params: bool = Field(
        False, description="ZeRO-3 / FSDP2: keep parameters on CPU between uses."
    )
    offload_threads: int | None = Field(
        None,
        gt=0,
        description="ZeRO with offload_optimizer: CPU threads per process for the optimizer "
        "step (DeepSpeed's CPU Adam). null: OMP_NUM_THREADS when it asks for more than 1 "
        "(launchers set 1 when it is unset), else this process's share of the cores it may "
        "run on (os.sched_getaffinity / processes on the machine).",
    )
    deepspeed_config: PathStr | None = Field(
        None,
        description="A DeepSpeed JSON used as the base instead of the generated one; batch, "
        "precision and clipping must agree with this config (checked).",
    )
    reduce_bucket_size: int | None = Field(
        None,
        gt=0,
        description="ZeRO: elements per gradient reduce bucket; null: the model's "
        "hidden_size squared (accelerate fills it in at prepare). ZeRO-3's prefetch bucket "
        "(0.9 x) and parameter persistence threshold (10 x its square root) follow it.",
    )
    fsdp_layer_cls: list[str] | None = Field(
        None,
        description="FSDP2: module class names wrapped as units; default: the model's "
        "_no_split_modules (its decoder layer).",
    )
    fsdp_reshard_after_forward: bool = Field(
        True, description="FSDP2: free gathered parameters after forward (ZeRO-3-like)."
    )
    fsdp_reduce_dtype: Literal["float32", "bfloat16"] = Field(
        "float32",
        description="FSDP2 with bf16/fp16 precision: dtype gradients are reduced across "
        "processes and accumulated over micro-batches in. float32 (torchtitan's default) "
        "keeps sums of many small gradients exact enough; bfloat16 halves that traffic.",
    )
    fsdp_cpu_ram_efficient_loading: bool = Field(
        True,
        description="FSDP2: only rank 0 reads the weights; the other ranks build the model "
        "without them and receive their shards from rank 0 when it is sharded, so loading "
        "needs one model copy of host RAM per machine instead of one per process. QLoRA's "
        "4-bit weights are read by every rank (accelerate does not broadcast them).",
    )


class GenerateConfig(Section):
    """Generation-based evaluation on held-out instruction rows."""

    enabled: bool = Field(False, description="Generate answers and score exact match.")
    num_examples: int = Field(32, gt=0, description="Held-out rows to generate for.")
    max_new_tokens: int = Field(32, gt=0, description="Generation length limit.")
    batch_size: int = Field(16, gt=0, description="Prompts per generate() call.")


class EarlyStoppingConfig(Section):
    """Stop when the tracked metric (eval.metric) stops improving."""

    patience: int | None = Field(
        None,
        gt=0,
        description="Evaluations in a row without improvement before stopping; null = off.",
    )
    min_delta: float = Field(
        0.0, ge=0, description="Smallest change of eval.metric that counts as an improvement."
    )


class EvalConfig(Section):
    """Periodic evaluation on the validation split."""

    every_steps: int | None = Field(
        None, gt=0, description="Evaluate every N optimizer steps (and at the end)."
    )
    at_start: bool = Field(False, description="Also evaluate before the first step.")
    max_batches: int | None = Field(None, gt=0, description="Cap on validation micro-batches.")
    batch_size: int | None = Field(None, gt=0, description="Eval micro-batch (default: train's).")
    generate: GenerateConfig = Field(
        default_factory=GenerateConfig, description="Exact-match scoring by generation."
    )
    scorer: str | None = Field(
        None,
        description="Custom generation scorer 'module:function' called with (predictions, "
        "references) and returning a dict of metrics (needs generate.enabled).",
    )
    metric: str = Field(
        "eval_loss",
        description="Metric that picks the best checkpoint and drives early stopping, e.g. "
        "eval_loss, eval_accuracy, eval_f1_macro, eval_auc, exact_match.",
    )
    mode: Literal["auto", "min", "max"] = Field(
        "auto",
        description="Whether lower or higher eval.metric is better; auto: min for loss, "
        "perplexity, mse and mae, max otherwise.",
    )
    early_stopping: EarlyStoppingConfig = Field(
        default_factory=EarlyStoppingConfig, description="Early stopping on eval.metric."
    )

    @field_validator("scorer")
    @classmethod
    def _module_function(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(
            r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*", value
        ):
            raise ValueError("write it as 'module:function', e.g. 'my_metrics:score'")
        return value

    @property
    def higher_is_better(self) -> bool:
        if self.mode != "auto":
            return self.mode == "max"
        return not any(k in self.metric for k in ("loss", "ppl", "mse", "mae"))


class CheckpointConfig(Section):
    """Resumable checkpoints and the final export."""

    every_steps: int | None = Field(
        None, gt=0, description="Write a resumable checkpoint every N optimizer steps."
    )
    keep_last: int = Field(2, ge=1, description="Checkpoints kept; older ones are deleted.")
    export: bool = Field(
        True, description="Write the final model (safetensors + tokenizer) to output_dir/final."
    )
    keep_best: bool = Field(
        False,
        description="Checkpoint every new best eval.metric and keep it beside the last ones; "
        "checkpoints/best.json names it. On by default with early stopping.",
    )
    load_best_at_end: bool = Field(
        False,
        description="Final evaluation and export use the best checkpoint's weights "
        "(needs eval.every_steps; implies keep_best).",
    )


TRACKERS = ("tensorboard", "wandb", "mlflow", "trackio")
Tracker = Literal["tensorboard", "wandb", "mlflow", "trackio"]


class LoggingConfig(Section):
    """Console logging and experiment trackers (metrics.jsonl is always written)."""

    progress_bar: bool = Field(
        True,
        description="Rich progress bar on the main process in a terminal; false, or output "
        "to a file (Slurm, nohup, CI), prints one plain line per logged step instead.",
    )
    trackers: list[Tracker] | Literal["auto"] = Field(
        "auto",
        description="Experiment trackers that receive every metric: tensorboard, wandb, "
        "mlflow, trackio; [] for none. 'auto': tensorboard when it is installed. All write "
        "locally: TensorBoard to output_dir/tensorboard, MLflow to output_dir/mlflow.db "
        "(unless MLFLOW_TRACKING_URI is set), W&B offline (unless WANDB_MODE is set).",
    )
    project: str | None = Field(
        None, description="Tracker project / experiment name; default: output_dir's name."
    )
    run_name: str | None = Field(
        None, description="Run name shown by the trackers; default: the tracker's own."
    )

    @field_validator("trackers", mode="before")
    @classmethod
    def _known_trackers(cls, value: Any) -> Any:
        if isinstance(value, str) and value != "auto":
            value = [value]  # `logging.trackers=wandb` on the command line
        for name in value if isinstance(value, list) else []:
            if name not in TRACKERS:
                close = difflib.get_close_matches(str(name), TRACKERS, n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                raise ValueError(
                    f"unknown tracker {name!r}{hint}; choose from {', '.join(TRACKERS)}, "
                    "'auto', or [] for none"
                )
        return value


_SLURM_TIME = r"^(\d+|\d+:\d{1,2}|\d+:\d{1,2}:\d{1,2}|\d+-\d+(:\d{1,2}){0,2}|INFINITE|UNLIMITED)$"


class SlurmConfig(Section):
    """`bigft slurm render|submit|sweep`: the sbatch request and how each node launches.

    Every string is passed to sbatch or the shell quoted; none may contain a line break.
    """

    job_name: str | None = Field(None, description="Job name; default: output_dir's name.")
    partition: str | None = Field(None, description="--partition; default: the cluster's.")
    account: str | None = Field(None, description="--account to charge.")
    qos: str | None = Field(None, description="--qos.")
    time: str | None = Field(
        None,
        description="--time limit, e.g. '2-00:00:00' or '04:00:00' (quote it in YAML: "
        "unquoted 1:00:00 reads as a number). Default: the partition's limit.",
    )
    nodes: int = Field(1, ge=1, description="Nodes; one launcher task runs on each.")
    gpus_per_node: int = Field(
        0, ge=0, description="--gpus-per-node; 0 requests none (CPU, or whole-node clusters)."
    )
    processes_per_node: int | None = Field(
        None,
        ge=1,
        description="Training processes per node; default: the GPUs Slurm gives the node "
        "(SLURM_GPUS_ON_NODE, else CUDA_VISIBLE_DEVICES, else nvidia-smi, else 1).",
    )
    cpus_per_task: int | None = Field(
        None,
        ge=1,
        description="--cpus-per-task for the one task per node (all its ranks). Default: "
        "ranks x cpus_per_gpu with gpus_per_node set, else processes_per_node (one CPU per "
        "rank), else Slurm's default of one CPU.",
    )
    cpus_per_gpu: int = Field(
        8,
        ge=1,
        description="CPUs per rank (data loading, NCCL, the Python process itself) that "
        "the default cpus_per_task asks for when GPUs are requested.",
    )
    mem: str | None = Field(None, description="--mem per node, e.g. '480G'; '0' = all.")
    constraint: str | None = Field(None, description="--constraint, e.g. 'h100'.")
    exclusive: bool = Field(False, description="--exclusive: do not share nodes.")
    signal_seconds: int = Field(
        300,
        ge=0,
        le=65535,
        description="Send USR1 this many seconds before the time limit, so the run "
        "checkpoints and requeues itself; 0 disables.",
    )
    requeue: bool = Field(
        True, description="--requeue, and requeue the job after a USR1 stop (auto-resume)."
    )
    max_restarts: int = Field(
        3, ge=0, description="Refuse to start (or requeue) once SLURM_RESTART_COUNT exceeds it."
    )
    launcher: Literal["torchrun", "accelerate"] = Field(
        "torchrun", description="Per-node launcher: torchrun (c10d rendezvous) or accelerate."
    )
    accelerate_config: PathStr | None = Field(
        None, description="accelerate config file (DeepSpeed/FSDP) for launcher: accelerate."
    )
    master_port: int | None = Field(
        None, ge=1024, le=65535, description="Rendezvous port; default 20000 + job id % 20000."
    )
    rdzv_timeout_s: int = Field(
        900, gt=0, description="How long nodes wait for each other at start (join_timeout)."
    )
    nccl_socket_ifname: str | None = Field(
        None, description="NCCL_SOCKET_IFNAME (and GLOO_SOCKET_IFNAME), e.g. 'ib0' or '^lo'."
    )
    nccl_ib_disable: bool | None = Field(
        None, description="NCCL_IB_DISABLE: true forces TCP sockets (no InfiniBand)."
    )
    nccl_debug: str | None = Field(None, description="NCCL_DEBUG, e.g. WARN or INFO.")
    nccl_heartbeat_timeout_s: int | None = Field(
        None, gt=0, description="TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC: kill a hung collective."
    )
    env: dict[str, str] = Field(
        default_factory=dict, description="Extra environment variables exported to the job."
    )
    setup_script: PathStr | None = Field(
        None, description="Shell file sourced before launching (module load, venv, ...)."
    )
    python: PathStr | None = Field(
        None, description="Python that runs bigft on the nodes; default: the one rendering."
    )
    sbatch_extra: list[str] = Field(
        default_factory=list,
        description="Extra sbatch options, one per item, e.g. '--mail-type=END'.",
    )

    @field_validator("*", mode="before")
    @classmethod
    def _one_line(cls, value: Any) -> Any:
        items = value.items() if isinstance(value, dict) else [value]
        for item in items:
            for text in item if isinstance(item, tuple | list) else [item]:
                if isinstance(text, str) and any(c in text for c in "\n\r\0"):
                    raise ValueError("must be a single line (no line breaks)")
        return value

    @field_validator("mem", mode="before")
    @classmethod
    def _mem_format(cls, value: Any) -> Any:
        # sbatch --mem: a whole number, megabytes unless suffixed K, M, G or T; 0 = all.
        if isinstance(value, int) and not isinstance(value, bool):
            value = str(value)  # `mem: 0` or `mem: 64000` in YAML
        if isinstance(value, str) and not re.fullmatch(r"\d+[KMGTkmgt]?", value):
            raise ValueError(
                "not a memory size sbatch accepts; a whole number with an optional K, M, G "
                "or T suffix (megabytes without), e.g. 480G, or 0 for all of each node's memory"
            )
        return value

    @field_validator("time", mode="before")
    @classmethod
    def _time_format(cls, value: Any) -> Any:
        if isinstance(value, int | float):
            raise ValueError("write the time limit as a quoted string, e.g. '04:00:00'")
        if value is not None and not re.match(_SLURM_TIME, str(value)):
            raise ValueError("not a Slurm time: use MM, HH:MM:SS, D-HH or D-HH:MM:SS")
        return value

    @field_validator("env", mode="before")
    @classmethod
    def _env_names(cls, value: Any) -> Any:
        if not isinstance(value, dict):
            return value
        for name in value:
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", str(name)):
                raise ValueError(f"{name!r} is not a valid environment variable name")
        # YAML reads `OMP_NUM_THREADS: 8` as a number; the environment holds strings.
        scalar = (bool, int, float)
        return {
            str(k): (str(v).lower() if isinstance(v, bool) else str(v))
            if isinstance(v, scalar)
            else v
            for k, v in value.items()
        }


TASK_METRICS: dict[str, tuple[str, ...]] = {
    "causal_lm": ("eval_loss", "eval_ppl"),
    "classification": ("eval_loss", "eval_accuracy", "eval_f1_macro", "eval_auc"),
    "regression": ("eval_loss", "eval_mse", "eval_mae", "eval_r2"),
    "image_classification": ("eval_loss", "eval_accuracy", "eval_f1_macro", "eval_auc"),
    "contrastive": (
        "eval_loss",
        "eval_i2t_r1",
        "eval_i2t_r5",
        "eval_t2i_r1",
        "eval_t2i_r5",
        "eval_zero_shot_accuracy",
    ),
}

IMAGE_TASKS = ("image_classification", "contrastive")
TASK_METRICS["preference"] = (
    "eval_loss",
    "eval_rewards/chosen",
    "eval_rewards/rejected",
    "eval_rewards/margin",
    "eval_rewards/accuracy",
    "eval_logps/chosen",
    "eval_logps/rejected",
)
# Tasks whose rows hold a text and a label, read by bigft.data.labeled.
TEXT_LABEL_TASKS = ("classification", "regression")


class HardwareConfig(Section):
    """The machines a config is written for. `bigft plan CONFIG` plans for them when no
    --gpu / --gpus-per-node / --nodes is given; training itself runs on what it finds
    (`train.micro_batch_size: auto` plans for the CUDA device it sees, for hardware.gpu
    when it sees none)."""

    gpu: str | None = Field(
        None,
        description="GPU model from the planner's catalogue (bigft/plan/hardware.py), e.g. "
        "rtx4090, a100-80, h100-80 (aliases such as h100-80gb are accepted and stored by "
        "their catalogue name); null: not named (bigft plan assumes h100-80).",
    )
    gpus_per_node: int | None = Field(
        None, ge=1, description="GPUs (training processes) per node; null: slurm's, else 1."
    )
    nodes: int | None = Field(None, ge=1, description="Nodes; null: slurm.nodes, else 1.")

    @field_validator("gpu")
    @classmethod
    def _known_gpu(cls, value: str | None) -> str | None:
        if value is None:
            return None
        from bigft.plan.hardware import get_gpu  # no torch: the catalogue is plain data

        try:
            return get_gpu(value).name
        except ConfigError as exc:
            raise ValueError(str(exc).replace(" (or pass --gpu-mem GIB)", "")) from None


class ContrastiveConfig(Section):
    """task contrastive: symmetric InfoNCE between image and text embeddings (Radford et
    al. 2021, CLIP), scaled by the model's learnable temperature (logit_scale)."""

    gather: bool = Field(
        True,
        description="Use the images and texts of every process as negatives (a global batch "
        "of micro_batch_size x processes); gradients flow through the gathered embeddings, "
        "so the update equals one process holding the whole batch.",
    )
    learn_temperature: bool = Field(
        True, description="Train the model's logit_scale; false keeps it as loaded."
    )
    classification_weight: float = Field(
        0.0,
        ge=0,
        description="Add this weight x cross-entropy of each labelled image against the "
        "prompts of data.label_names (the zero-shot classifier), 0: off.",
    )
    prompt: str = Field(
        "a photo of {label}",
        description="Text of each class for zero-shot accuracy and classification_weight; "
        "{label} is the class name.",
    )

    @field_validator("prompt")
    @classmethod
    def _has_label(cls, value: str) -> str:
        if "{label}" not in value:
            raise ValueError("needs a {label} placeholder, e.g. 'a photo of {label}'")
        return value


class PreferenceConfig(Section):
    """task preference: align a model with preference data. Losses:
    dpo (Rafailov et al. 2023, "Direct Preference Optimization"; label_smoothing > 0 is
    the conservative cDPO of Mitchell 2023), ipo (Azar et al. 2023, "A General Theoretical
    Paradigm to Understand Learning from Human Preferences"), simpo (Meng et al. 2024,
    "SimPO: Simple Preference Optimization with a Reference-Free Reward"), orpo (Hong et
    al. 2024, "ORPO: Monolithic Preference Optimization without Reference Model"), kto
    (Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization")."""

    loss: Literal["dpo", "ipo", "simpo", "orpo", "kto"] = Field(
        "dpo", description="The preference loss (see the section's papers)."
    )
    beta: float = Field(
        0.1,
        gt=0,
        description="dpo / kto: scale of the log-ratio to the reference (the KL strength); "
        "ipo: the regularisation tau (target margin 1 / (2 beta)); simpo: the reward scale "
        "(the paper uses 2.0-2.5); orpo: unused.",
    )
    label_smoothing: float = Field(
        0.0, ge=0, lt=0.5, description="dpo: the assumed share of flipped preference labels."
    )
    simpo_gamma: float = Field(
        0.5, ge=0, description="simpo: the target reward margin gamma (the paper's 0.5-1.6)."
    )
    orpo_lambda: float = Field(
        0.1, gt=0, description="orpo: weight of the odds-ratio term added to the SFT loss."
    )
    kto_desirable_weight: float = Field(
        1.0, gt=0, description="kto: weight of desirable (label true) completions."
    )
    kto_undesirable_weight: float = Field(
        1.0, gt=0, description="kto: weight of undesirable (label false) completions."
    )
    precompute_reference: bool = Field(
        False,
        description="dpo / ipo: score every prepared pair with the reference once, before "
        "step 1, and keep the log-probabilities with the prepared data (reused by later "
        "runs of the same data and model); training then holds one model, not a frozen "
        "copy. With lora / dora / qlora it saves the adapters-disabled forward of each "
        "step.",
    )
    prompt_field: str = Field("prompt", description="Column of the prompt (text or messages).")
    chosen_field: str = Field("chosen", description="Column of the preferred completion.")
    rejected_field: str = Field("rejected", description="Column of the other completion.")
    completion_field: str = Field(
        "completion",
        description="kto: column of the completion; data.label_field says "
        "whether it is desirable (true) or not (false).",
    )


class DistillConfig(Section):
    """Knowledge distillation from a teacher that shares the student's tokenizer / labels."""

    teacher: PathStr | None = Field(
        None, description="Teacher model directory or hub id; null = no distillation."
    )
    temperature: float = Field(2.0, gt=0, description="Softmax temperature of both models.")
    weight: float = Field(
        0.5,
        ge=0,
        le=1,
        description="loss = (1 - weight) x task loss + weight x T^2 x KL(teacher || student).",
    )


class Config(Section):
    """A bigft run. Sections mirror the data flow: model, data, method, optim, schedule,
    train, eval, checkpoint, logging."""

    task: Literal[
        "causal_lm",
        "classification",
        "regression",
        "image_classification",
        "contrastive",
        "preference",
    ] = Field(
        "causal_lm",
        description="causal_lm: next-token loss on text/instructions/chats; classification: "
        "a sequence-classification head over data.label_field (cross-entropy); regression: "
        "one output trained with MSE; image_classification: an image model "
        "(AutoModelForImageClassification) with a head for data.label_names; contrastive: "
        "an image-text dual encoder (CLIP) trained to match each image with its text; "
        "preference: a causal LM aligned with chosen / rejected completions (section "
        "preference).",
    )
    model: ModelConfig = Field(description="The model to fine-tune.")
    data: DataConfig = Field(description="Training and evaluation data.")
    method: MethodConfig = Field(default_factory=MethodConfig, description="What is trained.")
    optim: OptimConfig = Field(default_factory=OptimConfig, description="Optimizer.")
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig, description="LR schedule.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Training loop.")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="Evaluation.")
    checkpoint: CheckpointConfig = Field(
        default_factory=CheckpointConfig, description="Checkpoints and export."
    )
    parallel: ParallelConfig = Field(
        default_factory=ParallelConfig, description="Distribution strategy."
    )
    distill: DistillConfig = Field(
        default_factory=DistillConfig, description="Knowledge distillation."
    )
    contrastive: ContrastiveConfig = Field(
        default_factory=ContrastiveConfig, description="task contrastive: the loss."
    )
    preference: PreferenceConfig = Field(
        default_factory=PreferenceConfig, description="task preference: the loss and data."
    )
    logging: LoggingConfig = Field(default_factory=LoggingConfig, description="Logging.")
    slurm: SlurmConfig = Field(
        default_factory=SlurmConfig, description="Slurm job: resources, launch, requeue."
    )
    hardware: HardwareConfig = Field(
        default_factory=HardwareConfig,
        description="The GPUs this config is written for (what bigft plan plans for).",
    )
    output_dir: PathStr = Field(
        description="Run directory: resolved config, metrics, checkpoints, final model. "
        "A relative path in the config file resolves against the file's folder, one given "
        "on the command line (output_dir=...) against the working directory; ~ is your home."
    )

    @model_validator(mode="after")
    def _method_consistency(self) -> Config:
        m, o = self.method, self.optim
        if o.lr_adapters is not None and m.name in ("full", "freeze"):
            raise ValueError(f"optim.lr_adapters is set but method {m.name} has no adapters")
        sharded = self.parallel.strategy in ("zero3", "fsdp2")
        if m.name == "qlora" and sharded and m.quant.quant_storage == "uint8":
            raise ValueError(
                f"qlora with {self.parallel.strategy}: set method.quant.quant_storage to the "
                "model dtype (e.g. bfloat16) so 4-bit weights can be sharded with the rest"
            )
        wanted = {"bf16": "bfloat16", "fp16": "float16"}.get(self.train.precision)
        if m.name == "qlora" and sharded and wanted and m.quant.quant_storage != wanted:
            raise ValueError(
                f"qlora with {self.parallel.strategy} and train.precision "
                f"{self.train.precision}: set method.quant.quant_storage to {wanted}; the "
                "engine casts every weight to the compute dtype, packed 4-bit bytes included"
            )
        return self

    @model_validator(mode="after")
    def _hardware_consistency(self) -> Config:
        hw, slurm = self.hardware, self.slurm
        for name in ("nodes", "gpus_per_node"):
            mine, theirs = getattr(hw, name), getattr(slurm, name)
            if mine is not None and name in slurm.model_fields_set and mine != theirs:
                raise ValueError(
                    f"hardware.{name} {mine} and slurm.{name} {theirs} disagree; set it in "
                    "one place (hardware falls back to slurm's)"
                )
        return self

    @model_validator(mode="after")
    def _task_consistency(self) -> Config:
        d = self.data
        if d.streaming and (self.task != "causal_lm" or self.train.steps is None):
            raise ValueError(
                "data.streaming needs task causal_lm and train.steps (a stream has no "
                "known length to count epochs in)"
            )
        if d.streaming and d.near_duplicates is not None:
            raise ValueError(
                "data.near_duplicates compares every row with every other: not with "
                "data.streaming (prepare the data instead)"
            )
        if d.streaming and d.augment.text is not None:
            raise ValueError(
                "data.augment.text: augmented rows are made when the data is prepared; "
                "not with data.streaming"
            )
        if d.augment.image is not None and self.task not in IMAGE_TASKS:
            raise ValueError(
                f"data.augment.image: task {self.task} has no images (task "
                "image_classification or contrastive)"
            )
        if d.augment.text is not None and self.task in IMAGE_TASKS:
            raise ValueError(
                f"data.augment.text applies to text tasks, not task {self.task}; use "
                "data.augment.image"
            )
        if self.task == "preference":
            if d.label_names is not None or d.text_pair_field is not None:
                raise ValueError(
                    "data.label_names / text_pair_field: task preference reads "
                    "prompt / chosen / rejected (section preference)"
                )
            if self.distill.teacher is not None:
                raise ValueError("distill.teacher: not with task preference")
            pref = self.preference
            if pref.precompute_reference and pref.loss not in ("dpo", "ipo"):
                why = (
                    "draws its KL rows per batch, so they cannot be scored ahead"
                    if pref.loss == "kto"
                    else "has no reference model"
                )
                raise ValueError(
                    f"preference.precompute_reference: loss {pref.loss} {why}; "
                    "set it false (dpo and ipo can precompute)"
                )
            if self.eval.generate.enabled:
                raise ValueError("eval.generate: generation applies to task causal_lm only")
            return self
        if self.task == "causal_lm":
            if d.label_names is not None or d.text_pair_field is not None:
                raise ValueError("data.label_names / text_pair_field need task classification")
            return self
        if self.task in IMAGE_TASKS and self.train.micro_batch_size == "auto":
            raise ValueError(
                f"train.micro_batch_size auto: the memory planner models language models, "
                f"not task {self.task}; give a number"
            )
        if self.task in IMAGE_TASKS and d.text_pair_field is not None:
            raise ValueError(f"data.text_pair_field: task {self.task} reads one text per image")
        if self.task == "contrastive" and self.parallel.strategy in ("zero3", "fsdp2"):
            raise ValueError(
                f"task contrastive with parallel.strategy {self.parallel.strategy}: the loss "
                "reads the model's logit_scale, which a sharded engine splits; use ddp, "
                "zero1 or zero2"
            )
        if self.distill.teacher is not None and self.task in IMAGE_TASKS:
            raise ValueError(f"distill.teacher: distillation is not available for task {self.task}")
        if any(isinstance(e, TrainSource) for e in d.train if not isinstance(d.train, str)):
            raise ValueError(
                f"task {self.task}: data.train lists plain paths only (sources with their "
                "own format, weight or epochs apply to task causal_lm)"
            )
        # data.format and data.packing keep their (causal-LM) defaults in a dumped config,
        # so only a format that cannot mean "text + label" is an error.
        if d.format == "chat":
            raise ValueError(
                f"task {self.task} reads data.text_field and data.label_field; "
                "data.format chat applies to task causal_lm only"
            )
        if self.eval.generate.enabled:
            raise ValueError("eval.generate: generation applies to task causal_lm only")
        if self.task == "regression" and d.label_names is not None:
            raise ValueError("data.label_names: regression labels are numbers")
        return self

    @model_validator(mode="after")
    def _eval_consistency(self) -> Config:
        stopping = self.eval.early_stopping.patience is not None
        if (stopping or self.checkpoint.load_best_at_end) and self.eval.every_steps is None:
            raise ValueError(
                "eval.early_stopping / checkpoint.load_best_at_end need eval.every_steps"
            )
        if self.eval.scorer is not None and not self.eval.generate.enabled:
            raise ValueError("eval.scorer scores generated answers: set eval.generate.enabled")
        known = TASK_METRICS[self.task]
        if self.eval.generate.enabled:
            known = (*known, "exact_match")
        if self.eval.metric not in known and self.eval.scorer is None:
            hint = difflib.get_close_matches(self.eval.metric, known, n=1)
            raise ValueError(
                f"eval.metric '{self.eval.metric}' is not reported for task {self.task}"
                + (f"; did you mean '{hint[0]}'?" if hint else "")
                + f" (one of: {', '.join(known)})"
            )
        return self

    @model_validator(mode="after")
    def _schedule_fits(self) -> Config:
        warmup, steps = self.schedule.warmup_steps, self.train.steps
        if warmup is not None and steps is not None and warmup > steps:
            raise ValueError(
                f"schedule.warmup_steps: {warmup} warmup steps in a run of {steps} "
                "(train.steps); lower it, or use schedule.warmup_ratio"
            )
        return self

    @model_validator(mode="after")
    def _batch_consistency(self) -> Config:
        t = self.train
        if (
            t.grad_accum is not None
            and t.global_batch_size is not None
            and isinstance(t.micro_batch_size, int)
            and t.global_batch_size % (t.micro_batch_size * t.grad_accum) != 0
        ):
            raise ValueError(
                "train.global_batch_size must equal micro_batch_size x grad_accum x world "
                "size; set only one of grad_accum and global_batch_size"
            )
        return self
