"""Dotted overrides reach into optional sections (a section that may be null)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from bigft.config_io import load_config
from bigft.errors import ConfigError


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "cfg.yaml"
    values = {
        "task": "image_classification",
        "model": {"name_or_path": str(tmp_path)},
        "data": {"train": str(tmp_path)},
        "output_dir": str(tmp_path / "run"),
    }
    path.write_text(yaml.safe_dump(values))
    return path


def test_a_key_of_an_unset_optional_section(config: Path) -> None:
    cfg = load_config(
        config, ["data.augment.image.rotation=20", "data.augment.image.vertical_flip=0.5"]
    )
    assert cfg.data.augment.image is not None
    assert (cfg.data.augment.image.rotation, cfg.data.augment.image.vertical_flip) == (20, 0.5)


def test_an_optional_section_set_to_null_and_refused_as_a_scalar(config: Path) -> None:
    cfg = load_config(config, ["data.augment.image={rotation: 5}", "data.augment.image=null"])
    assert cfg.data.augment.image is None
    with pytest.raises(ConfigError, match="data.augment.image: a section, not a value"):
        load_config(config, ["data.augment.image=3"])
