"""Image rows: the three kinds of source give the same rows, bad rows are one line naming
file and line, and augmentation reaches training batches only."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from bigft.commands import app
from bigft.config_io import load_config
from bigft.data.images import ImageCollator, prepare_images
from bigft.data.labeled import make_collator
from bigft.digits import NAMES, save_resnet_base, write_digits
from bigft.errors import DataError

CLASSES = [NAMES[d] for d in range(3)]


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The digits 0-2 (8 of each) as an image folder, a jsonl file and a saved dataset."""
    from datasets import Dataset, Image

    root = tmp_path_factory.mktemp("images")
    folder = write_digits(root / "folder", range(3), size=16, limit=8)
    jsonl = write_digits(root / "files", range(3), size=16, limit=8, layout="jsonl")
    rows = [json.loads(line) for line in jsonl.read_text().splitlines()]
    saved = Dataset.from_dict(
        {
            "picture": [str(jsonl.parent / r["image"]) for r in rows],
            "label": [r["label"] for r in rows],
        }
    ).cast_column("picture", Image())
    saved.save_to_disk(str(root / "saved"))
    base = save_resnet_base(root / "base", CLASSES, size=16)
    return {"folder": folder, "jsonl": jsonl, "saved": root / "saved", "base": base}


def config(tmp_path: Path, base: Path, train: Path, **data: Any) -> Path:
    values = {
        "task": "image_classification",
        "model": {"name_or_path": str(base)},
        "data": {"train": str(train), "split": {"train": 0.75, "validation": 0.25}, **data},
        "train": {"micro_batch_size": 4, "steps": 2},
        "output_dir": str(tmp_path / "run"),
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def pixels_by_class(data: Any, names: list[str]) -> list[tuple[str, bytes]]:
    """(class, image content) of every row, sorted: comparable across sources."""
    from bigft.data.images import open_image

    rows = []
    for split in (data.train, data.validation):
        for row in split:
            rows.append((names[row["label"]], open_image(row["image"]).tobytes()))
    return sorted(rows)


def test_three_kinds_of_source_give_the_same_rows(sources: dict[str, Path], tmp_path: Path) -> None:
    results = []
    for kind, extra in (("folder", {}), ("jsonl", {}), ("saved", {"image_field": "picture"})):
        cfg = load_config(config(tmp_path, sources["base"], sources[kind], **extra))
        data, names = prepare_images(cfg)
        assert names == sorted(CLASSES)
        assert len(data.train) == 18 and len(data.validation) == 6
        results.append(pixels_by_class(data, names))
    assert results[0] == results[1] == results[2]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda r: r.update(image="images/missing.png"),
            r"\.jsonl:5: image 'images/missing.png' not found",
        ),
        (
            lambda r: r.update(image="notes.txt"),
            r"\.jsonl:5: image 'notes.txt' is not an image file",
        ),
        (lambda r: r.update(label="eleven"), r"\.jsonl:5: label 'eleven' is not one of"),
        (lambda r: r.pop("image"), r"\.jsonl:5: 'image' is missing"),
    ],
)
def test_a_bad_row_is_one_line_naming_file_and_line(
    sources: dict[str, Path], tmp_path: Path, change: Any, message: str
) -> None:
    rows = [json.loads(line) for line in sources["jsonl"].read_text().splitlines()]
    change(rows[4])
    bad = sources["jsonl"].parent / f"bad-{len(list(tmp_path.iterdir()))}.jsonl"
    (sources["jsonl"].parent / "notes.txt").write_text("not an image\n")
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config(config(tmp_path, sources["base"], bad, label_names=CLASSES))
    with pytest.raises(DataError, match=message):
        prepare_images(cfg)
    cli_config = config(tmp_path, sources["base"], bad, label_names=CLASSES)
    result = CliRunner().invoke(app, ["train", str(cli_config)])
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and "Traceback" not in result.output
    assert str(bad) in lines[0]
    assert not (tmp_path / "run").exists()


def test_augmentation_reaches_training_batches_only(
    sources: dict[str, Path], tmp_path: Path
) -> None:
    """The training loader's images are changed (differently each epoch, the same for the
    same seed); evaluation batches are the processor's output of the files as they are."""
    from bigft.data.images import EpochRows
    from bigft.data.loader import TrainLoader
    from bigft.eval.split import eval_batches
    from bigft.loop.run import EvalContext
    from bigft.model.load import load_preprocessor

    augment = {"image": {"rotation": 30, "random_resized_crop": [0.5, 0.9], "color_jitter": 0.3}}
    cfg = load_config(config(tmp_path, sources["base"], sources["folder"], augment=augment))
    data, names = prepare_images(cfg)
    processor = load_preprocessor(cfg)
    plain = ImageCollator(processor)  # no augmentation

    def loader(seed: int) -> TrainLoader:
        seeded = cfg.model_copy(update={"train": cfg.train.model_copy(update={"seed": seed})})
        collate = make_collator(seeded, processor, None, names, train=True)
        rows = EpochRows(data.train)
        return TrainLoader(rows, 6, 0, 1, seed, False, collate)

    batches = iter(loader(0))
    first, second, third = next(batches), next(batches), next(batches)  # 18 rows: 3 a epoch
    epoch2 = next(batches)  # epoch 1 starts over the same rows (no shuffle)
    same = plain([data.train[i] for i in range(6)])
    assert torch.equal(first["labels"], same["labels"])
    assert not torch.allclose(first["pixel_values"], same["pixel_values"], atol=1e-3)
    assert not torch.allclose(first["pixel_values"], epoch2["pixel_values"], atol=1e-3)
    assert torch.equal(first["pixel_values"], next(iter(loader(0)))["pixel_values"])
    assert not torch.equal(first["pixel_values"], next(iter(loader(1)))["pixel_values"])
    assert second["pixel_values"].shape == third["pixel_values"].shape

    ctx = EvalContext(
        cfg=cfg,
        accelerator=type("Acc", (), {"process_index": 0, "num_processes": 1})(),
        model=torch.nn.Linear(1, 1),
        tokenizer=processor,
        data=data,
        layout=type("Layout", (), {"micro_batch_size": 6})(),
        metrics=None,
        console=None,
        label_names=names,
    )
    held_out = list(eval_batches(ctx, "validation"))
    expected = plain([data.validation[i] for i in range(len(data.validation))])
    assert torch.equal(torch.cat([b["pixel_values"] for b in held_out]), expected["pixel_values"])
    assert np.array_equal(torch.cat([b["labels"] for b in held_out]), expected["labels"])
