"""Errors of the NeuroVault sources: ``str(exc)`` is a short, specific reason for the QC table."""

from __future__ import annotations

__all__ = [
    "CorruptFile",
    "Forbidden",
    "NeuroVaultError",
    "NotFound",
    "NotJSON",
    "OfflineError",
    "ServerError",
    "TooLarge",
    "UnsafeInput",
]


class NeuroVaultError(Exception):
    """A request or file could not be had. ``str(exc)`` is a short specific reason."""

    def __init__(self, reason: str, url: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.url = url


class NotFound(NeuroVaultError):
    """HTTP 404 (unknown or deleted record, image of a private collection, missing file)."""


class Forbidden(NeuroVaultError):
    """HTTP 403 (private collection, API or media)."""


class OfflineError(NeuroVaultError):
    """A network call was attempted in offline mode."""


class CorruptFile(NeuroVaultError):
    """A file is truncated, not gzip, not a NIfTI, or arrived incomplete after re-attempts."""


class TooLarge(NeuroVaultError):
    """A declared or actual size above ``max_file_bytes`` / ``max_json_bytes``."""


class UnsafeInput(NeuroVaultError, ValueError):
    """A server- or caller-provided value that must not be used (bad id, foreign or tricky URL)."""


class ServerError(NeuroVaultError):
    """5xx/429 after retries, timeouts, connection failures, redirect loops."""


class NotJSON(NeuroVaultError):
    """The server answered something other than JSON where JSON was expected (e.g. an HTML page)."""


class _Truncated(Exception):
    """Body cut short or connection broken mid-body (internal: triggers a bounded re-attempt)."""
