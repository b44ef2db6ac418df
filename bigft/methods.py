"""What is trained: full fine-tuning (every parameter). Other methods plug in here."""

from __future__ import annotations

from typing import Any

from bigft.config import Config


def apply_method(model: Any, cfg: Config) -> Any:
    """Prepare a loaded model for the configured method; returns the model to train."""
    return model
