"""Errors raised while reading or validating adapter files; each maps to one HTTP status."""

from __future__ import annotations


class AdapterFormatError(ValueError):
    """An adapter file that cannot be served; ``message`` says what is wrong and where."""

    status_code = 422

    def __init__(self, message: str, *, where: str | None = None):
        self.message = message if where is None else f"{where}: {message}"
        super().__init__(self.message)


class UnsupportedAdapterTypeError(AdapterFormatError):
    """A well-formed adapter of a kind we do not serve (e.g. a PEFT LoRA)."""

    status_code = 415


class BaseModelMismatchError(AdapterFormatError):
    """An adapter made for another base model (modules or shapes differ)."""


class AdapterTooLargeError(AdapterFormatError):
    """A file over ``--max-adapter-bytes``."""

    status_code = 413
