"""The exceptions vramflow raises on purpose; the CLI turns each into one clear line."""

from __future__ import annotations


class VramflowError(Exception):
    """Base class: anything vramflow reports to a user as a readable message."""

    exit_code = 1


class ConfigError(VramflowError):
    """A setting or parameter is invalid."""

    exit_code = 2


class DocumentError(VramflowError):
    """A whole document cannot be processed (broken, encrypted, empty, not a PDF, too big)."""


class NotAPdfError(DocumentError):
    """The file is empty or is not a PDF at all."""


class EncryptedPdfError(DocumentError):
    """The PDF is encrypted and no password, or a wrong one, was given."""


class LimitExceededError(DocumentError):
    """The input is larger or slower than a configured limit allows."""


class ModelError(VramflowError):
    """The model cannot be found or loaded."""


class SlotError(VramflowError):
    """The GPU slot cannot be set up or acquired (for example the Prefect API is unreachable)."""


class InferenceError(VramflowError):
    """A model call failed."""


class InferenceOOMError(InferenceError):
    """The device ran out of memory even after splitting the batch down to one page."""


class InferenceTimeoutError(InferenceError):
    """A model call ran longer than the configured limit."""


class NoGpuWorkerError(InferenceError):
    """No GPU worker took a batch in time: none is running for the Prefect server."""
