"""The methods each stage offers, by name: the one list the schema, the config check and the rules read.

The schema file names no method: :func:`nvmeta.workflow.config.load_schema` writes these lists into
its ``enum`` of ``meta.methods``, ``cbma.methods`` and ``atlas.method`` (:data:`SCHEMA_ENUMS`) before
anything validates against it or renders it (README's config reference), and the rules' wildcard
constraints (``workflow/rules/common.smk``, ``cbma.smk``) join the same lists.

- :func:`meta_methods`: the image-based estimators, each with what it pools per map (``"z"``: z-maps;
  ``"effect"``: Hedges' g and its variance). The estimator classes register under these names in
  :data:`nvmeta.meta.registry.ESTIMATORS`, whose import brings scipy into every parse of the
  workflow, so their names and ``needs`` are listed here and ``tests/test_methods.py`` checks that the
  two agree.
- :func:`cbma_methods`: the keys of :data:`nvmeta.cbma.estimate.ESTIMATORS` (NiMARE's estimators).
- :func:`atlas_methods`: the keys of :data:`nvmeta.decode.sums.METHODS` (the z estimators whose
  statistics are sums over the maps).
"""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["SCHEMA_ENUMS", "atlas_methods", "cbma_methods", "effect_methods", "meta_methods", "z_methods"]

#: Image-based estimators in the order the schema lists them: name -> what it reads per map.
_META: dict[str, str] = {
    "stouffer": "z",
    "weighted_stouffer": "z",
    "fisher": "z",
    "ttest": "z",
    "permutation": "z",
    "dersimonian_laird": "effect",
    "hedges": "effect",
    "fixed_effects_hedges": "effect",
    "median": "effect",
    "trimmed_mean": "effect",
}


def meta_methods() -> dict[str, str]:
    """``meta.methods`` values -> what the estimator pools per map (``"z"`` or ``"effect"``)."""
    return dict(_META)


def z_methods() -> list[str]:
    """The image-based methods that read the per-image z-maps."""
    return [name for name, needs in _META.items() if needs == "z"]


def effect_methods() -> list[str]:
    """The image-based methods that read the per-image g / var(g) maps."""
    return [name for name, needs in _META.items() if needs == "effect"]


def cbma_methods() -> list[str]:
    """``cbma.methods`` values: the NiMARE estimators of :data:`nvmeta.cbma.estimate.ESTIMATORS`."""
    from nvmeta.cbma.estimate import ESTIMATORS

    return list(ESTIMATORS)


def atlas_methods() -> list[str]:
    """``atlas.method`` values: the estimators :mod:`nvmeta.decode.sums` builds a reference map with."""
    from nvmeta.decode.sums import METHODS

    return list(METHODS)


#: Where each list goes in the schema: the path of the node (through ``$defs`` / ``properties``)
#: whose ``enum`` it is, and the list.
SCHEMA_ENUMS: dict[tuple[str, ...], Callable[[], list[str]]] = {
    ("$defs", "meta", "properties", "methods", "items"): lambda: list(_META),
    ("$defs", "cbma", "properties", "methods", "items"): cbma_methods,
    ("properties", "atlas", "properties", "method"): atlas_methods,
}
