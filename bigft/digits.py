"""Handwritten digits as an image data set that ships offline, and a small ResNet for them.

scikit-learn carries the 1,797 UCI handwritten digits (8 x 8 grey levels). They are
upscaled into RGB image files, the shape real image data sets have, so the image tasks
(`task: image_classification`, `task: contrastive`) are exercised on real files, folders
and captions. `save_resnet_base` writes a randomly initialized ResNet (`ResNetConfig`)
with its image processor; pretrained on some digits by `bigft train`, it is a real base
for transfer to the others.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def digit_images(size: int = 32) -> tuple[list[Any], np.ndarray]:
    """(RGB PIL images of `size` x `size`, their digits) for all 1,797 digits."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = []
    for pixels in digits.images:
        grey = Image.fromarray((pixels * (255 / 16)).astype(np.uint8), mode="L")
        images.append(grey.resize((size, size), Image.Resampling.BILINEAR).convert("RGB"))
    return images, digits.target.astype(np.int64)


def caption(digit: int) -> str:
    """The caption of an image of `digit`: "a photo of the digit seven"."""
    return f"a photo of the digit {NAMES[digit]}"


def write_digits(
    out_dir: str | Path,
    digits: Sequence[int] = tuple(range(10)),
    layout: str = "folder",
    size: int = 32,
    limit: int | None = None,
) -> Path:
    """Write the images of `digits` under `out_dir` and return the data path.

    layout 'folder': one sub-folder per class (named by the digit's word), the image-folder
    layout; returns `out_dir`. layout 'jsonl': images/ plus `digits.jsonl` rows
    {"image": relative path, "label": word, "text": caption}; returns the jsonl file.
    `limit`: at most this many images of each digit.
    """
    out = Path(out_dir)
    images, targets = digit_images(size)
    rows, seen = [], dict.fromkeys(digits, 0)
    for i, (image, digit) in enumerate(zip(images, targets.tolist(), strict=True)):
        if digit not in seen or (limit is not None and seen[digit] >= limit):
            continue
        seen[digit] += 1
        folder = out / NAMES[digit] if layout == "folder" else out / "images"
        folder.mkdir(parents=True, exist_ok=True)
        name = f"{i:04d}.png"
        image.save(folder / name)
        rows.append(
            {
                "image": f"images/{name}",
                "label": NAMES[digit],
                "text": caption(digit),
            }
        )
    if layout == "folder":
        return out
    path = out / "digits.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _class_names(labels: Sequence[str]) -> dict[str, Any]:
    """A classifier config's head arguments for `labels`, in id order."""
    return {
        "num_labels": len(labels),
        "id2label": dict(enumerate(labels)),
        "label2id": {name: i for i, name in enumerate(labels)},
    }


def save_resnet_base(
    out_dir: str | Path, labels: Sequence[str], size: int = 32, seed: int = 0
) -> Path:
    """A randomly initialized small ResNet classifier for `labels`, with an image processor
    for `size` x `size` images, saved with `save_pretrained`."""
    import torch
    from transformers import ResNetConfig, ResNetForImageClassification
    from transformers.models.convnext.image_processing_pil_convnext import (
        ConvNextImageProcessorPil,
    )

    config = ResNetConfig(  # type: ignore[call-arg]
        num_channels=3,
        embedding_size=16,
        hidden_sizes=[16, 32, 64],
        depths=[1, 1, 1],
        layer_type="basic",
        downsample_in_first_stage=False,
        **_class_names(labels),
    )
    torch.manual_seed(seed)
    model = ResNetForImageClassification(config)
    out = Path(out_dir)
    model.save_pretrained(out)
    ConvNextImageProcessorPil(size={"shortest_edge": size}, crop_pct=1.0).save_pretrained(out)
    return out


def save_vit_base(
    out_dir: str | Path, labels: Sequence[str], size: int = 32, seed: int = 0
) -> Path:
    """A randomly initialized small ViT classifier (patches of 4 x 4 pixels) for `labels`,
    with a ViT image processor for `size` x `size` images, saved with `save_pretrained`."""
    import torch
    from transformers import ViTConfig, ViTForImageClassification
    from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil

    config = ViTConfig(  # type: ignore[call-arg]
        image_size=size,
        patch_size=4,
        num_channels=3,
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=128,
        **_class_names(labels),
    )
    torch.manual_seed(seed)
    model = ViTForImageClassification(config)
    out = Path(out_dir)
    model.save_pretrained(out)
    ViTImageProcessorPil(size={"height": size, "width": size}).save_pretrained(out)
    return out


def write_examples(out_dir: str | Path, size: int = 16) -> Path:
    """Everything configs/examples/digits-*.yaml read, under `out_dir`: digits 0-4 and 5-9
    as image folders, all digits with captions (jsonl), and randomly initialized bases: a
    ViT and a ResNet for 0-4, a tiny CLIP with its processor."""
    from bigft.tiny_clip import save_tiny_clip

    out = Path(out_dir)
    write_digits(out / "digits-0-4", range(5), size=size)
    write_digits(out / "digits-5-9", range(5, 10), size=size)
    write_digits(out / "captions", layout="jsonl", size=size)
    first = [NAMES[d] for d in range(5)]
    save_vit_base(out / "vit-random", first, size=size)
    save_resnet_base(out / "resnet-random", first, size=size)
    save_tiny_clip(out / "clip-random", [caption(d) for d in range(10)], image_size=size)
    return out


if __name__ == "__main__":
    import sys

    target = write_examples(sys.argv[1] if len(sys.argv) > 1 else "digits")
    print(f"wrote the digit images and the base models under {target}")
