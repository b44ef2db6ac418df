"""User-facing errors: the CLI prints their message on one line and exits with code 2."""

from __future__ import annotations


class BigftError(Exception):
    """A mistake the user can fix (config, data, paths, missing package).

    The message names the file, line or key and says what to do; the CLI prints it
    without a traceback.
    """

    exit_code = 2


class ConfigError(BigftError):
    """The YAML or an override is invalid."""


class DataError(BigftError):
    """A data file is missing, malformed, or yields no usable rows."""


class ModelError(BigftError):
    """The model or tokenizer cannot be loaded as configured."""


class TrainingError(BigftError):
    """The run started but stopped itself rather than continue unsafely (non-finite loss,
    a checkpoint that could not be written). The message names the step and what was
    kept; exit code 3 tells it apart from a config mistake."""

    exit_code = 3


def require(package: str, extra: str, purpose: str) -> None:
    """Fail clearly when an optional package is missing."""
    import importlib.util

    if importlib.util.find_spec(package) is None:
        raise BigftError(
            f"{purpose} needs the optional package '{package}': "
            f"pip install 'bigft[{extra}]' (or pip install {package})"
        )


class RowError(ValueError):
    """A problem with one data row; the data pipeline prefixes it with `file:line`."""
