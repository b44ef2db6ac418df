"""bigft: fine-tune large language models, planned before they run."""

__version__ = "0.1.0"
