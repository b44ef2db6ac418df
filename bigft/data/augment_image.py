"""Train-time image augmentation (data.augment.image), on PIL images before the model's
image processor.

Each image's changes are drawn from a generator seeded with (train.seed, epoch, row), so
an epoch sees new crops and flips, a resumed run sees exactly what an uninterrupted one
saw, and loader workers change nothing. The operations are PIL's own (crop and resize,
transpose, rotate, ImageEnhance); the parameters follow torchvision's RandomResizedCrop,
RandomHorizontalFlip, RandomRotation and ColorJitter.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from bigft.config import ImageAugmentConfig


def augment_image(image: Any, cfg: ImageAugmentConfig, seed: int, epoch: int, row: int) -> Any:
    """`image` (PIL, RGB) changed as `cfg` says, deterministically for (seed, epoch, row)."""
    from PIL import Image, ImageEnhance

    rng = np.random.default_rng([seed, epoch, row])
    if cfg.random_resized_crop is not None:
        image = _random_resized_crop(image, cfg.random_resized_crop, rng)
    if cfg.horizontal_flip and rng.random() < cfg.horizontal_flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if cfg.vertical_flip and rng.random() < cfg.vertical_flip:
        image = image.transpose(Image.Transpose.FLIP_TOP_BOTTOM)
    if cfg.rotation:
        angle = float(rng.uniform(-cfg.rotation, cfg.rotation))
        image = image.rotate(angle, resample=Image.Resampling.BILINEAR)
    if cfg.color_jitter:
        x = cfg.color_jitter
        for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
            image = enhance(image).enhance(float(rng.uniform(1 - x, 1 + x)))
    return image


def _random_resized_crop(image: Any, share: tuple[float, float], rng: np.random.Generator) -> Any:
    """torchvision's RandomResizedCrop: an area of `share` of the image with an aspect
    ratio in [3/4, 4/3] (log-uniform), resized back to the image's size; ten tries, then
    the whole image."""
    from PIL import Image

    width, height = image.size
    area = width * height
    for _ in range(10):
        target = area * rng.uniform(*share)
        ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        w = round(math.sqrt(target * ratio))
        h = round(math.sqrt(target / ratio))
        if 0 < w <= width and 0 < h <= height:
            left = int(rng.integers(0, width - w + 1))
            top = int(rng.integers(0, height - h + 1))
            box = (left, top, left + w, top + h)
            return image.resize((width, height), Image.Resampling.BILINEAR, box=box)
    return image
