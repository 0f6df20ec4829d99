"""Exceptions shared across nvmeta modules (kept import-free)."""

from __future__ import annotations

__all__ = ["ConfigError"]


class ConfigError(ValueError):
    """A configuration value is invalid.

    The message names the full config key path (e.g. ``analyses.pain.image_terms.map_type``)
    and says how to fix it, so that it can be shown to the user as is.
    """
