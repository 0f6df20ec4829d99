"""Every output of the z methods against an independent computation, on one fixed study.

The study has partial coverage, four collections, varied n, a positive, a negative and a null
region. For each method, ``combine_within`` and sidedness, the units are rebuilt from the maps as
nibabel reads them and the statistics are computed with numpy and scipy (Stouffer
``Σ z / √k``, weighted Stouffer with ``√n`` weights, Fisher's χ² with ``2k`` df, scipy's
``ttest_1samp``), FDR with statsmodels' Benjamini–Hochberg, Bonferroni by hand, clusters with
``scipy.ndimage.label``. ``permutation`` is checked for what it shares with ``ttest`` (its z and p)
and for the properties of its FWE p-values (nilearn's ``permuted_ols`` itself is the reference in
``tests/test_meta.py``).
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from scipy import ndimage, stats

from nvmeta.meta import run_method
from nvmeta.workflow import methods

AFFINE = np.array([[3.0, 0, 0, -24], [0, 3.0, 0, -30], [0, 0, 3.0, -18], [0, 0, 0, 1]])
SHAPE = (14, 16, 12)
N_MAPS = 9
ALPHA = 0.05
N_PERM = 50
CASES = [(m, cw, ts) for m in methods.z_methods() for cw in ("none", "collection") for ts in (True, False)]


def _n(i: int) -> int:
    return 10 + 5 * i


def _collection(i: int) -> int:
    return 7 + i % 4


def build(root: Path) -> tuple[nib.Nifti1Image, np.ndarray]:
    """Write the study (z-maps, qc.json with n, qc.tsv); return the mask image and the mask."""
    rng = np.random.default_rng(20261201)
    mask = np.zeros(SHAPE, np.uint8)
    mask[1:-1, 1:-1, 1:-1] = 1
    m = mask > 0
    ijk = np.indices(SHAPE)
    blob = np.exp(-(((ijk - np.array([4, 5, 5])[:, None, None, None]) ** 2).sum(0)) / 4.0)
    neg = np.exp(-(((ijk - np.array([10, 11, 6])[:, None, None, None]) ** 2).sum(0)) / 3.0)
    rows = []
    for i in range(N_MAPS):
        z = rng.normal(size=SHAPE) + 4.0 * blob - 3.0 * neg
        if _collection(i) == 8 or i == 6:  # partial coverage, of one collection's every map too
            z[:, :, 9:] = np.nan
        d = root / "maps" / str(100 + i)
        d.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(np.where(m, z, np.nan).astype(np.float32), AFFINE), d / "zmap.nii.gz")
        (d / "qc.json").write_text(json.dumps({"image_id": 100 + i, "n": _n(i)}))
        rows.append({"image_id": 100 + i, "collection_id": _collection(i), "number_of_subjects": _n(i),
                     "status": "included"})  # fmt: skip
    pd.DataFrame(rows).to_csv(root / "qc.tsv", sep="\t", index=False)
    return nib.Nifti1Image(mask, AFFINE), m


def _zmap(root: Path, image_id: int) -> Path:
    return root / "maps" / str(image_id) / "zmap.nii.gz"


def units(root: Path, m: np.ndarray, combine_within: str) -> tuple[np.ndarray, np.ndarray]:
    """The units' z (units x mask voxels, NaN = no data) and n: each map, or per collection the
    Stouffer combination of its maps and their mean n."""
    maps = np.stack(
        [np.asarray(nib.load(_zmap(root, 100 + i)).dataobj, np.float64)[m] for i in range(N_MAPS)]
    )
    ns = np.array([_n(i) for i in range(N_MAPS)], dtype=np.float64)
    if combine_within == "none":
        return maps, ns
    groups = [
        [i for i in range(N_MAPS) if _collection(i) == c]
        for c in dict.fromkeys(map(_collection, range(N_MAPS)))
    ]
    z = []
    for g in groups:
        have = np.isfinite(maps[g])
        c = have.sum(axis=0)
        with np.errstate(invalid="ignore", divide="ignore"):
            z.append(np.where(c > 0, np.nansum(maps[g], axis=0) / np.sqrt(c), np.nan))
    return np.stack(z), np.array([ns[g].mean() for g in groups])


def reference(method: str, z: np.ndarray, n: np.ndarray, two_sided: bool) -> tuple[np.ndarray, np.ndarray]:
    """``(z, p)`` per voxel over the units with data there (NaN where there are none)."""
    have = np.isfinite(z)
    k = have.sum(axis=0)
    z0 = np.where(have, z, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        if method == "stouffer":
            zc = z0.sum(axis=0) / np.sqrt(k)
        elif method == "weighted_stouffer":
            w = np.sqrt(n)[:, None] * have
            zc = (w * z0).sum(axis=0) / np.sqrt((w**2).sum(axis=0))
        elif method == "fisher":
            p_pos = stats.chi2.sf(-2 * np.where(have, stats.norm.logsf(z), 0.0).sum(axis=0), 2 * k)
            if not two_sided:
                return stats.norm.isf(p_pos), p_pos
            p_neg = stats.chi2.sf(-2 * np.where(have, stats.norm.logcdf(z), 0.0).sum(axis=0), 2 * k)
            p = np.minimum(1.0, 2 * np.minimum(p_pos, p_neg))
            return np.where(p_neg < p_pos, -1.0, 1.0) * stats.norm.isf(p / 2), p
        else:  # ttest, and permutation's parametric z
            res = stats.ttest_1samp(z, 0.0, axis=0, nan_policy="omit")
            t, df = np.asarray(res.statistic), k - 1.0
            zc = np.sign(t) * stats.norm.isf(stats.t.sf(np.abs(t), df))
            p = stats.t.sf(t, df) if not two_sided else np.asarray(res.pvalue)
            return np.where(k >= 2, zc, np.nan), np.where(k >= 2, p, np.nan)
    zc = np.where(k > 0, zc, np.nan)
    return zc, (2 * stats.norm.sf(np.abs(zc)) if two_sided else stats.norm.sf(zc))


def _vec(out: Path, name: str, m: np.ndarray) -> np.ndarray:
    return np.asarray(nib.load(out / f"{name}.nii.gz").dataobj, np.float64)[m]


def _cluster_sizes_and_peaks(zthr: np.ndarray, two_sided: bool) -> list[tuple[int, float]]:
    """(size, peak |z| with its sign) of every face-connected cluster of the non-zero voxels."""
    found = []
    for sign in (1.0, -1.0) if two_sided else (1.0,):
        labels, n = ndimage.label(np.nan_to_num(sign * zthr) > 0)  # the default: 6-connected
        for c in range(1, n + 1):
            vals = zthr[labels == c]
            found.append((int(vals.size), float(vals[np.argmax(np.abs(vals))])))
    return sorted(found)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    mask_img, m = build(root)
    return root, mask_img, m


@pytest.mark.parametrize(("method", "cw", "two_sided"), CASES)
def test_outputs_match_an_independent_computation(study, tmp_path, method, cw, two_sided):
    from statsmodels.stats.multitest import multipletests

    root, mask_img, m = study
    cfg = {"combine_within": cw, "two_sided": two_sided, "n_perm": N_PERM, "min_cluster_voxels": 1,
           "cut_coords": [0, 6], "jackknife": False}  # fmt: skip
    out = tmp_path / method
    summary = run_method(method, root / "qc.tsv", lambda i: _zmap(root, i), mask_img, cfg, out)
    uz, un = units(root, m, cw)
    z_ref, p_ref = reference(method, uz, un, two_sided)
    k_ref = np.isfinite(uz).sum(axis=0)
    reported = k_ref >= 2  # min_maps: 2
    if method == "permutation":  # the sign-flip test needs every unit at the voxel
        reported = k_ref == len(uz)
    assert summary["k_units"] == len(uz) == (N_MAPS if cw == "none" else 4)
    assert reported.sum() > 100 and (k_ref < len(uz)).any()  # partial coverage: k varies

    np.testing.assert_array_equal(_vec(out, "k", m), k_ref)
    z, p = _vec(out, "z", m), _vec(out, "p", m)
    np.testing.assert_array_equal(np.isfinite(z), reported)
    np.testing.assert_allclose(z[reported], z_ref[reported], rtol=1e-6, atol=1e-6)  # z is float32
    np.testing.assert_allclose(p[reported], p_ref[reported], rtol=1e-9, atol=0)
    logp = _vec(out, "logp", m)
    np.testing.assert_allclose(logp[reported], -np.log10(p_ref[reported]), rtol=1e-6, atol=1e-6)
    assert np.all(np.isnan(p[~reported]))
    assert np.all(np.isnan(np.asarray(nib.load(out / "z.nii.gz").dataobj)[~m]))

    # FDR (Benjamini-Hochberg over the reported voxels) and Bonferroni; one-sided: positive z only
    q_ref = multipletests(p_ref[reported], method="fdr_bh")[1]
    np.testing.assert_allclose(_vec(out, "q", m)[reported], q_ref, rtol=1e-6)
    positive = np.ones(reported.sum(), bool) if two_sided else z_ref[reported] > 0
    for name, sig in (("z_fdr", (q_ref < ALPHA) & positive),
                      ("z_bonf", (p_ref[reported] < ALPHA / reported.sum()) & positive)):  # fmt: skip
        zthr = _vec(out, name, m)
        assert np.all(np.isnan(zthr[~reported]))
        np.testing.assert_array_equal(zthr[reported] != 0, sig, err_msg=name)
        np.testing.assert_array_equal(zthr[reported][sig], z[reported][sig])
    n_fdr = int(((q_ref < ALPHA) & positive).sum())
    assert summary["n_significant_fdr"] == n_fdr
    # (a two-sided t on the 4 collections, df = 3, finds nothing at this FDR level)
    assert n_fdr > 0 or (cw == "collection" and two_sided and method in ("ttest", "permutation"))

    # cluster tables: ids 1..N without gaps; the clusters are those of the thresholded map
    for table_name, map_name in (("clusters", "z_fdr"), ("clusters_bonf", "z_bonf")):
        zthr = _vec(out, map_name, m)
        vol = np.zeros(SHAPE)
        vol[m] = np.nan_to_num(zthr)
        t = pd.read_csv(out / f"{table_name}.tsv", sep="\t", dtype={"Cluster ID": str})
        main = t[t["Cluster Size (voxels)"].notna()]
        assert main["Cluster ID"].tolist() == [str(i) for i in range(1, len(main) + 1)]
        sizes = main["Cluster Size (voxels)"].astype(int)
        assert sizes.sum() == int(np.count_nonzero(vol))  # min_cluster_voxels: 1
        np.testing.assert_allclose(main["Cluster Size (mm3)"].astype(float), 27.0 * sizes)
        found = _cluster_sizes_and_peaks(vol, two_sided)
        got = sorted(zip(sizes, main["Peak Stat"].astype(float), strict=True))
        assert [s for s, _ in got] == [s for s, _ in found]
        np.testing.assert_allclose([v for _, v in got], [v for _, v in found], atol=1e-3)

    if method == "permutation":
        p_fwe = _vec(out, "p_fwe", m)[reported]
        counts = p_fwe * (N_PERM + 1)
        np.testing.assert_allclose(counts, np.rint(counts), atol=1e-4)  # (1 + #maxima >= T) / (1 + n_perm)
        assert counts.min() >= 1 and counts.max() <= N_PERM + 1
        # the FWE p-value falls as the voxel's statistic grows
        stat = np.abs(z_ref[reported]) if two_sided else z_ref[reported]
        order = np.argsort(stat, kind="stable")
        assert np.all(np.diff(p_fwe[order]) <= 1e-7)
        assert summary["n_significant_fwe"] == int(
            ((p_fwe < ALPHA) & (two_sided | (z_ref[reported] > 0))).sum()
        )
