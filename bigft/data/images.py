"""Rows with an image: data for `task: image_classification` and `task: contrastive`.

A source is an image folder (one sub-folder per class, named by the class), a .jsonl /
.csv / .parquet file whose data.image_field holds image paths (relative to the file's
folder), or a directory saved with `Dataset.save_to_disk` whose image column holds
images or paths. Rows carry the class (data.label_field; required for image
classification, optional for contrastive) and, for contrastive, the caption
(data.text_field). Every image is opened and checked before any model is loaded: a
missing or unreadable file is reported by file and line.

Prepared rows keep the image's reference (path or bytes), not its pixels: the collator
reads and augments each image as the loader asks for it, then runs the model's image
processor (the one saved with the model).
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import Dataset

from bigft.config import Config, DataConfig, ImageAugmentConfig
from bigft.data.labels import label_names_from, map_checked
from bigft.data.pipeline import DataStats, PreparedData, SplitStats, assemble_splits
from bigft.data.sources import load_rows, row_location
from bigft.errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
NO_CLASS = -1  # a contrastive row without a class


def is_image_folder(path: str) -> bool:
    """An image-folder source: a directory of class sub-folders (not a saved dataset)."""
    p = Path(path)
    if not p.is_dir() or (p / "dataset_info.json").is_file() or (p / "state.json").is_file():
        return False
    return any(child.is_dir() for child in p.iterdir())


def _folder_rows(path: str) -> Dataset:
    root = Path(path)
    images, labels = [], []
    for folder in sorted(c for c in root.iterdir() if c.is_dir() and not c.name.startswith(".")):
        for file in sorted(folder.rglob("*")):
            if file.suffix.lower() in IMAGE_SUFFIXES and file.is_file():
                images.append(str(file.resolve()))
                labels.append(folder.name)
    if not images:
        raise DataError(
            f"{path}: no image files ({', '.join(IMAGE_SUFFIXES)}) in its class sub-folders"
        )
    return Dataset.from_dict({"image": images, "label": labels})


def read_source(path: str, cfg: DataConfig) -> Dataset:
    """A source's raw rows; an image folder's columns are named data.image_field and
    data.label_field, like any other source's."""
    if is_image_folder(path):
        rows = _folder_rows(path)
        return rows.rename_columns({"image": cfg.image_field, "label": cfg.label_field})
    rows = load_rows(path)
    if cfg.image_field not in rows.column_names:
        raise DataError(
            f"{path}: rows have no '{cfg.image_field}' column (data.image_field); columns: "
            f"{', '.join(rows.column_names)}"
        )
    return rows


class _Check:
    """Raw rows -> {"image": path or bytes, "label": class id, "text": caption}, or a
    one-line error naming the row's problem."""

    def __init__(self, cfg: DataConfig, task: str, names: list[str] | None, base: Path) -> None:
        self.cfg, self.task, self.base = cfg, task, base
        self.ids = {name: i for i, name in enumerate(names or [])}
        self.numeric = bool(names) and all(n.lstrip("-").isdigit() for n in names or [])

    def image(self, value: Any) -> dict[str, Any]:
        from PIL import Image, UnidentifiedImageError

        field = self.cfg.image_field
        data: bytes | None
        path: str | None
        if isinstance(value, dict):  # a datasets Image column, undecoded
            data, path = value.get("bytes"), value.get("path")
        elif isinstance(value, str) and value.strip():
            data, path = None, value
        else:
            raise ValueError(f"'{field}' is missing or not an image path")
        shown = path or field
        if data is None:
            file = Path(path or "").expanduser()
            file = file if file.is_absolute() else self.base / file
            if not file.is_file():
                raise ValueError(f"image '{path}' not found (looked for {file})")
            path = str(file)
        try:
            with Image.open(io.BytesIO(data) if data is not None else str(path)) as img:
                img.verify()
        except UnidentifiedImageError:
            raise ValueError(f"image '{shown}' is not an image file PIL can read") from None
        except (OSError, SyntaxError) as exc:
            raise ValueError(f"image '{shown}' cannot be read ({exc})") from None
        return {"bytes": data, "path": path}

    def label(self, row: Mapping[str, Any]) -> int:
        value = row.get(self.cfg.label_field)
        if value is None or isinstance(value, bool):
            if self.task == "contrastive":
                return NO_CLASS
            raise ValueError(f"'{self.cfg.label_field}' is missing")
        key = str(value)
        if key in self.ids:
            return self.ids[key]
        if isinstance(value, int) and not self.numeric and 0 <= value < len(self.ids):
            return value
        if self.task == "contrastive" and not self.ids:
            return NO_CLASS
        raise ValueError(f"label {value!r} is not one of data.label_names {list(self.ids)[:10]}")

    def __call__(self, batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        out: dict[str, list[Any]] = {"image": [], "label": [], "text": [], "error": []}
        size = len(next(iter(batch.values()))) if batch else 0
        for i in range(size):
            row = {key: values[i] for key, values in batch.items()}
            image, label, text, error = {"bytes": None, "path": None}, NO_CLASS, "", ""
            try:
                image = self.image(row.get(self.cfg.image_field))
                label = self.label(row)
                if self.task == "contrastive":
                    caption = row.get(self.cfg.text_field)
                    if not isinstance(caption, str) or not caption.strip():
                        raise ValueError(f"'{self.cfg.text_field}' (the caption) is missing")
                    text = caption
            except ValueError as exc:
                error = str(exc)
            out["image"].append(image)
            out["label"].append(label)
            out["text"].append(text or "")
            out["error"].append(error)
        return out


def image_label_names(cfg: DataConfig, task: str, read: Any) -> list[str] | None:
    """The class names in id order: data.label_names, or the sorted distinct labels of the
    training sources (a contrastive data set without labels has none)."""
    unlabelled = not all(cfg.label_field in read(p).column_names for p in cfg.train_files)
    if task == "contrastive" and cfg.label_names is None and unlabelled:
        return None
    return label_names_from(cfg, read)


def prepare_images(cfg: Config) -> tuple[PreparedData, list[str] | None]:
    """Read, check and split the image rows of `cfg`; (the data, the class names)."""
    from datasets import Image

    data_cfg, task = cfg.data, cfg.task
    loaded: dict[str, Dataset] = {}

    def read(path: str) -> Dataset:
        if path not in loaded:
            loaded[path] = read_source(path, data_cfg)
        return loaded[path]

    names = image_label_names(data_cfg, task, read)

    def load(paths: list[str]) -> Dataset:
        parts = []
        for path in paths:
            raw = read(path)
            if isinstance(raw.features.get(data_cfg.image_field), Image):
                raw = raw.cast_column(data_cfg.image_field, Image(decode=False))
            base = Path(path) if Path(path).is_dir() else Path(path).parent
            check = _Check(data_cfg, task, names, base)
            folder = is_image_folder(path)

            def where(row: int, path: str = path, folder: bool = folder) -> str:
                return path if folder else row_location(path, row)

            parts.append(map_checked(raw, check, f"checking images of {path}", where))
        if len(parts) == 1:
            return parts[0]
        from datasets import concatenate_datasets

        return concatenate_datasets(parts)

    parts, sources = assemble_splits(data_cfg, load, cfg.train.seed)
    splits = {
        name: SplitStats(source=sources[name], rows_loaded=len(ds), rows_kept=len(ds))
        for name, ds in parts.items()
    }
    for name, ds in parts.items():
        splits[name].target_tokens = len(ds)
    stats = DataStats(seq_len=cfg.train.seq_len, splits=splits)
    return PreparedData(parts["train"], parts.get("validation"), parts.get("test"), stats), names


def open_image(ref: Mapping[str, Any]) -> Any:
    """The RGB PIL image a prepared row refers to (its bytes or its file)."""
    from PIL import Image

    data = ref.get("bytes")
    with Image.open(io.BytesIO(data) if data else ref["path"]) as img:
        return img.convert("RGB")


class EpochRows:
    """Training rows that tell the collator which (epoch, row) each one is: the loader's
    sampler hands out (epoch, index) pairs (`bigft.data.loader.TrainLoader`), so image
    augmentation is drawn per epoch and row, the same after a resume."""

    wants_epoch = True

    def __init__(self, rows: Dataset) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key: tuple[int, int] | int) -> dict[str, Any]:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        return {**self.rows[int(index)], "_draw": (int(epoch), int(index))}


def caption_key(text: str) -> int:
    """A stable 63-bit id of a caption: identical captions share it (retrieval metrics
    count them as one)."""
    import hashlib

    digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class ImageCollator:
    """Rows -> `pixel_values` from the model's image processor (after augmentation, for
    training rows) and `labels` (class ids; -1: a contrastive row without a class).

    Contrastive batches add `input_ids` / `attention_mask` from the processor's tokenizer:
    the captions, then one prompt per class (`prompts`) when given, and `caption_ids`
    (identical captions, identical ids) for the retrieval metrics."""

    def __init__(
        self,
        processor: Any,
        augment: ImageAugmentConfig | None = None,
        seed: int = 0,
        prompts: Sequence[str] | None = None,
        max_length: int | None = None,
        contrastive: bool = False,
    ) -> None:
        self.processor, self.augment, self.seed = processor, augment, seed
        self.prompts, self.max_length, self.contrastive = (
            list(prompts or []),
            max_length,
            contrastive,
        )

    def __call__(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        from bigft.data.augment_image import augment_image

        images = []
        for row in rows:
            image = open_image(row["image"])
            if self.augment is not None and "_draw" in row:
                epoch, index = row["_draw"]
                image = augment_image(image, self.augment, self.seed, epoch, index)
            images.append(image)
        labels = torch.tensor([int(r["label"]) for r in rows], dtype=torch.long)
        if not self.contrastive:
            pixels = self.processor(images=images, return_tensors="pt")["pixel_values"]
            return {"pixel_values": pixels, "labels": labels}
        captions = [str(r["text"]) for r in rows]
        encoded = self.processor(
            text=captions + self.prompts,
            images=images,
            padding=True,
            truncation=self.max_length is not None,
            max_length=self.max_length,
            return_tensors="pt",
        )
        keys = np.array([caption_key(c) for c in captions], dtype=np.int64)
        return {
            "pixel_values": encoded["pixel_values"],
            "input_ids": encoded["input_ids"],
            "attention_mask": encoded["attention_mask"],
            "labels": labels,
            "caption_ids": torch.from_numpy(keys),
        }


def preview_images(
    data: PreparedData, names: list[str] | None, cfg: Config, out: Any, n: int = 3
) -> None:
    """`bigft data preview` of an image task: rows per split and class, the first training
    rows (image, class, caption), and the augmentation training applies."""
    from rich.table import Table

    counts = Table("split", "images", "per class", title="image data")
    for split in ("train", "validation", "test"):
        rows = getattr(data, split)
        if rows is None:
            continue
        ids = np.asarray(rows["label"])
        per_class = ", ".join(
            f"{name} {int((ids == i).sum())}" for i, name in enumerate(names or [])
        )
        counts.add_row(split, f"{len(rows):,}", per_class or "no classes")
    out.print(counts)
    for i in range(min(n, len(data.train))):
        row = data.train[i]
        image = open_image(row["image"])
        label = int(row["label"])
        name = names[label] if names and label >= 0 else "no class"
        where = row["image"].get("path") or "(image bytes)"
        caption = f"  caption: {row['text']}" if cfg.task == "contrastive" else ""
        out.print(
            f"train row {i}: {where} ({image.width}x{image.height}) class {name}{caption}",
            highlight=False,
            soft_wrap=True,
        )
    augment = cfg.data.augment.image
    if augment is None:
        out.print("augmentation: none", highlight=False)
        return
    parts = augment.model_dump(exclude_defaults=True)
    settings = ", ".join(f"{k} {v}" for k, v in parts.items())
    out.print(
        f"augmentation (training images only, drawn anew each epoch from train.seed): "
        f"{settings}; validation and test images are used as they are",
        highlight=False,
        soft_wrap=True,
    )
