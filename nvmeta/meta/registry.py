"""The registry of meta-analysis methods: ``meta.methods`` name -> estimator class.

Built here, from the estimator modules' own lists, so that it is complete whichever module was
imported first and no estimator module imports another to fill it.
"""

from __future__ import annotations

from nvmeta.meta.effects import EFFECT_ESTIMATORS
from nvmeta.meta.estimators import Z_ESTIMATORS, Estimator
from nvmeta.meta.permutation import Permutation

__all__ = ["ESTIMATORS", "get_estimator"]

#: Method name -> estimator class (``meta.methods``): the z-combination methods, the permutation
#: test, then the effect-size methods.
ESTIMATORS: dict[str, type[Estimator]] = {
    cls.name: cls for cls in (*Z_ESTIMATORS, Permutation, *EFFECT_ESTIMATORS)
}


def get_estimator(name: str) -> type[Estimator]:
    """The estimator class registered as ``name`` (``ValueError`` naming the known ones)."""
    try:
        return ESTIMATORS[name]
    except KeyError:
        raise ValueError(f"unknown meta method {name!r}; expected one of {', '.join(ESTIMATORS)}") from None
