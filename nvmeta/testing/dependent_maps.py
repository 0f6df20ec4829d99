"""Planted truth for the dependence tests and benchmark: maps correlated within collections.

Collection ``j`` has ``n_j`` participants and contributes ``m`` maps (contrasts of the same
participants); at every voxel the maps' statistics are ``√ρ u_j + √(1 − ρ) e_ij`` with independent
standard normal ``u_j`` and ``e_ij`` (so each map is N(0, 1), two maps of one collection correlate
at ``ρ``, maps of different collections not at all), plus ``effect · √n_j`` where an effect is
planted. Voxels are independent: each is a replication of the same meta-analysis, so a
false-positive rate is the fraction of null voxels found significant.

:class:`ArraySource` hands such arrays to an estimator as a :class:`~nvmeta.meta.units.Source`
does with files, so the tests and ``benchmarks/bench_dependence.py`` run the estimators' own code.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import nibabel as nib
import numpy as np
import pandas as pd

from nvmeta.images.effectsize import one_sample
from nvmeta.meta.units import Source, Unit, plan_units


@dataclass
class DependentMaps:
    """Simulated maps: ``z`` (maps × voxels), per map its ``collection`` and sample size ``n``;
    ``g`` and ``v`` (Hedges' g and var g of the same statistics read as one-sample t)."""

    z: np.ndarray
    collection: np.ndarray
    n: np.ndarray
    g: np.ndarray = field(repr=False)
    v: np.ndarray = field(repr=False)

    def rows(self) -> pd.DataFrame:
        """``qc.tsv``-like rows (image ids 1 .. k)."""
        k = len(self.collection)
        return pd.DataFrame({
            "image_id": np.arange(1, k + 1), "collection_id": self.collection.astype(float),
            "number_of_subjects": self.n.astype(float), "status": "included",
        })  # fmt: skip


def simulate(
    rng: np.random.Generator,
    n_collections: int,
    maps_per_collection: int | list[int],
    rho: float,
    n_vox: int,
    *,
    effect: float = 0.0,
    n_range: tuple[int, int] = (15, 60),
) -> DependentMaps:
    """Maps of ``n_collections`` collections, ``maps_per_collection`` each (an int, or one per
    collection), within-collection correlation ``rho`` and standardised effect ``effect``."""
    sizes = (
        [int(maps_per_collection)] * n_collections
        if np.ndim(maps_per_collection) == 0
        else [int(s) for s in maps_per_collection]
    )
    zs, cols, ns = [], [], []
    for j, m in enumerate(sizes):
        n_j = int(rng.integers(n_range[0], n_range[1] + 1))
        u = rng.normal(size=n_vox)
        for _ in range(m):
            zs.append(np.sqrt(rho) * u + np.sqrt(1.0 - rho) * rng.normal(size=n_vox) + effect * np.sqrt(n_j))
            cols.append(j + 1)
            ns.append(n_j)
    z = np.asarray(zs)
    n = np.asarray(ns, dtype=np.float64)
    g = np.empty_like(z)
    v = np.empty_like(z)
    for i in range(len(z)):
        _, g[i], v[i] = one_sample(z[i], n[i])
    return DependentMaps(z=z, collection=np.asarray(cols), n=n, g=g, v=v)


class ArraySource(Source):
    """A :class:`~nvmeta.meta.units.Source` over in-memory maps (one unit per map, as
    ``combine_within: none``), for estimator-level tests and benchmarks."""

    def __init__(self, maps: DependentMaps, dependence: str = "none"):
        sizes = dict(zip(range(1, len(maps.n) + 1), maps.n.tolist(), strict=True))
        plan = plan_units(maps.rows(), "none", sizes.get, needs_n=True, dependence=dependence)
        n_vox = maps.z.shape[1]
        mask = np.ones((n_vox, 1, 1), dtype=bool)
        super().__init__(plan, lambda i: None, nib.Nifti1Image(mask.astype(np.uint8), np.eye(4)), mask)
        self.maps = maps

    def _iter_z(self) -> Iterator[tuple[Unit, np.ndarray]]:
        for unit in self.plan.units:
            yield unit, self.maps.z[unit.image_ids[0] - 1].copy()

    def _iter_effects(self) -> Iterator[tuple[Unit, np.ndarray, np.ndarray]]:
        for unit in self.plan.units:
            i = unit.image_ids[0] - 1
            yield unit, self.maps.g[i].copy(), self.maps.v[i].copy()
