"""Tests of nvmeta.meta (image-based meta-analysis) and nvmeta.figures.plotting.

Every estimator is checked against an independent reference: the seed example's formula
(nilearn ``math_img``), NiMARE's ``Stouffers``/``Fishers``, scipy's ``ttest_1samp`` and
``false_discovery_control``, a direct nilearn ``permuted_ols`` call, mpmath for far tails,
and hand-computed values.
"""

from __future__ import annotations

import json
import logging
import math
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from scipy import stats

from nvmeta import meta
from nvmeta.meta import combine, frozen_gc, log_chi2_sf_even, run_method, sensitivity
from nvmeta.testing import demo_pain_maps as pain_maps

AFFINE = np.array([[2.0, 0, 0, -20], [0, 2.0, 0, -24], [0, 0, 2.0, -16], [0, 0, 0, 1]])


# ---------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------


def make_mask(shape=(10, 12, 8)) -> nib.Nifti1Image:
    mask = np.zeros(shape, np.uint8)
    mask[1:-1, 1:-1, 1:-1] = 1
    mask[1, 1, 1] = 0  # not a plain box
    return nib.Nifti1Image(mask, AFFINE)


class Study:
    """Writes z-maps (mask voxels given as vectors) and a qc.tsv into a directory."""

    def __init__(self, root: Path, mask_img: nib.Nifti1Image):
        self.root = root
        self.mask_img = mask_img
        self.mask = np.asarray(mask_img.dataobj) > 0
        self.rows: list[dict] = []
        (root / "maps").mkdir(parents=True, exist_ok=True)

    @property
    def n_vox(self) -> int:
        return int(self.mask.sum())

    def add(self, image_id, vec, collection_id=None, n=20, status="included"):
        data = np.full(self.mask.shape, np.nan, np.float32)
        data[self.mask] = np.asarray(vec, dtype=np.float32)
        self.path(image_id).parent.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(data, self.mask_img.affine), self.path(image_id))
        # the one resolved sample size of the image, as the z-map job writes it
        qc_n = n if n is not None and np.isfinite(n) and n > 0 else None
        (self.path(image_id).with_name("qc.json")).write_text(json.dumps({"image_id": image_id, "n": qc_n}))
        self.rows.append(
            {
                "image_id": image_id,
                "collection_id": image_id if collection_id is None else collection_id,
                "name": f"map {image_id}",
                "contrast_definition": "a vs b",
                "number_of_subjects": n,
                "status": status,
                "reason": "" if status == "included" else "constant map",
            }
        )

    def path(self, image_id) -> Path:
        return self.root / "maps" / str(image_id) / "zmap.nii.gz"

    @property
    def qc(self) -> Path:
        p = self.root / "qc.tsv"
        pd.DataFrame(self.rows).to_csv(p, sep="\t", index=False)
        return p

    def run(self, method, cfg=None, outname=None, **kw):
        out = self.root / "out" / (outname or method)
        summary = run_method(method, self.qc, self.path, self.mask_img, cfg or {}, out, None, **kw)
        return summary, out

    def vec(self, out: Path, name: str) -> np.ndarray:
        return np.asarray(nib.load(out / f"{name}.nii.gz").dataobj, dtype=np.float64)[self.mask]


@pytest.fixture
def study(tmp_path):
    return Study(tmp_path, make_mask())


def random_maps(rng, k, n_vox, shift=0.5):
    return rng.normal(size=(k, n_vox)) + shift


# ---------------------------------------------------------------------------------------
# Stouffer
# ---------------------------------------------------------------------------------------


def test_stouffer_equals_seed_formula_on_full_coverage(study):
    from nilearn.image import math_img

    rng = np.random.default_rng(0)
    zs = random_maps(rng, 7, study.n_vox, shift=1.0)
    for i, z in enumerate(zs):
        study.add(100 + i, z)
    summary, out = study.run("stouffer")
    imgs = [nib.load(study.path(100 + i)) for i in range(7)]
    seed = math_img("np.sum(z_imgs, axis=3) / np.sqrt(z_imgs.shape[3])", z_imgs=imgs)
    expected = np.asarray(seed.dataobj, dtype=np.float64)[study.mask]
    got = study.vec(out, "z")
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
    # two-sided p from the combined z; k = 7 everywhere in the mask
    np.testing.assert_allclose(
        study.vec(out, "p"), 2 * stats.norm.sf(np.abs(expected)), rtol=1e-4, atol=1e-12
    )
    assert np.all(study.vec(out, "k") == 7)
    # float32, template grid, NaN outside the mask
    img = nib.load(out / "z.nii.gz")
    assert img.get_data_dtype() == np.float32
    assert img.shape == study.mask.shape and np.allclose(img.affine, AFFINE)
    assert np.all(np.isnan(np.asarray(img.dataobj)[~study.mask]))
    assert summary["k_maps"] == 7 and summary["n_voxels_reported"] == study.n_vox
    for name in ("z", "p", "k", "q", "z_fdr", "z_bonf"):
        assert (out / f"{name}.nii.gz").is_file()
    for name in ("clusters.tsv", "z.png", "summary.json"):
        assert (out / name).is_file()
    assert json.loads((out / "summary.json").read_text())["method"] == "stouffer"


def test_stouffer_per_voxel_k_by_hand(study):
    n = study.n_vox
    a, b, c = np.full(n, 1.0), np.full(n, 2.0), np.full(n, -0.5)
    a[0] = np.nan  # voxel 0: maps b, c
    a[1] = b[1] = np.nan  # voxel 1: only c -> k = 1 < min_maps = 2
    a[2] = b[2] = c[2] = np.nan  # voxel 2: no data
    for i, v in enumerate((a, b, c)):
        study.add(i + 1, v)
    summary, out = study.run("stouffer")
    z, k = study.vec(out, "z"), study.vec(out, "k")
    assert k[0] == 2 and k[1] == 1 and k[2] == 0 and k[3] == 3
    assert z[0] == pytest.approx((2.0 - 0.5) / math.sqrt(2), abs=1e-6)
    assert np.isnan(z[1]) and np.isnan(z[2])
    assert z[3] == pytest.approx((1 + 2 - 0.5) / math.sqrt(3), abs=1e-6)
    assert summary["n_voxels_reported"] == n - 2
    # min_maps = 1 reports voxel 1 (z = c)
    _, out1 = study.run("stouffer", {"min_maps": 1}, outname="m1")
    assert study.vec(out1, "z")[1] == pytest.approx(-0.5, abs=1e-6)


def test_min_maps_and_min_fraction(study):
    rng = np.random.default_rng(1)
    zs = random_maps(rng, 5, study.n_vox)
    cover = np.arange(study.n_vox) % 6  # voxel v has data in the first min(cover, 5) maps
    for i in range(5):
        v = zs[i].copy()
        v[cover <= i] = np.nan
        study.add(i + 1, v)
    kk = np.minimum(cover, 5)
    for cfg, kmin in [
        ({}, 2),
        ({"min_maps": 3}, 3),
        ({"min_fraction": 0.8}, 4),
        ({"min_maps": 5, "min_fraction": 0.1}, 5),
    ]:
        summary, out = study.run("stouffer", cfg, outname=f"s{kmin}")
        z = study.vec(out, "z")
        assert summary["min_maps_effective"] == kmin
        np.testing.assert_array_equal(np.isfinite(z), kk >= kmin)
        np.testing.assert_array_equal(study.vec(out, "k"), kk)
        assert summary["n_voxels_reported"] == int(np.sum(kk >= kmin))


# ---------------------------------------------------------------------------------------
# NiMARE references (test-only dependency)
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("partial", [False, True])
def test_matches_nimare(study, partial):
    from nimare.dataset import Dataset
    from nimare.meta.ibma import Fishers, Stouffers

    rng = np.random.default_rng(2)
    ns = [10, 20, 15, 40, 12, 25]
    zs = random_maps(rng, 6, study.n_vox, shift=0.7)
    if partial:  # some maps miss some voxels: NiMARE's liberal mask fits per set of maps
        zs[0, :20] = np.nan
        zs[1, 10:30] = np.nan
    source = {}
    for i, z in enumerate(zs):
        study.add(i + 1, z, n=ns[i])
        source[f"study{i}"] = {
            "contrasts": {
                "1": {
                    "images": {"z": str(study.path(i + 1).resolve())},
                    "metadata": {"sample_sizes": [ns[i]]},
                }
            }
        }
    with warnings.catch_warnings(), frozen_gc():
        warnings.simplefilter("ignore")
        dset = Dataset(source, target="mni152_2mm", mask=study.mask_img)
    cases = [
        ("stouffer", True, Stouffers(groupby=False)),
        ("stouffer", False, Stouffers(groupby=False, two_sided=False)),
        ("weighted_stouffer", True, Stouffers(groupby=False, use_sample_size=True)),
        ("fisher", True, Fishers(groupby=False)),
        ("fisher", False, Fishers(groupby=False, two_sided=False)),
    ]
    for method, two_sided, est in cases:
        with warnings.catch_warnings(), frozen_gc():
            warnings.simplefilter("ignore")
            res = est.fit(dset)
        z_ref = res.get_map("z", return_type="array")
        p_ref = res.get_map("p", return_type="array")
        _, out = study.run(method, {"two_sided": two_sided}, outname=f"{method}-{two_sided}")
        z, p = study.vec(out, "z"), study.vec(out, "p")
        assert np.isfinite(z).all()
        np.testing.assert_allclose(z, z_ref, atol=1e-5, err_msg=f"{method} two_sided={two_sided}")
        np.testing.assert_allclose(p, p_ref, atol=1e-6, rtol=1e-4, err_msg=f"{method} two_sided={two_sided}")


def test_weighted_stouffer_by_hand_and_missing_n(study):
    n = study.n_vox
    study.add(1, np.full(n, 1.0), n=16)
    study.add(2, np.full(n, 3.0), n=9)
    study.add(3, np.full(n, 5.0), n=float("nan"))  # left out with a warning
    summary, out = study.run("weighted_stouffer")
    expected = (4 * 1.0 + 3 * 3.0) / math.sqrt(16 + 9)
    np.testing.assert_allclose(study.vec(out, "z"), expected, atol=1e-6)
    assert summary["k_maps"] == 2
    assert any("without a sample size" in w for w in summary["warnings"])


# ---------------------------------------------------------------------------------------
# Fisher far tail
# ---------------------------------------------------------------------------------------


def test_log_chi2_sf_even_against_mpmath():
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.dps = 50
    xs = np.array([0.0, 0.5, 3.0, 40.0, 700.0, 1500.0, 5000.0, 20000.0, 60.0])
    ks = np.array([1, 2, 5, 3, 4, 21, 100, 1000, 1000])
    got = log_chi2_sf_even(xs, ks)
    for x, k, g in zip(xs, ks, got, strict=True):
        ref = float(mpmath.log(mpmath.gammainc(int(k), mpmath.mpf(x) / 2, regularized=True)))
        assert g == pytest.approx(ref, rel=1e-10, abs=1e-12), (x, k)


def test_fisher_extreme_z_is_finite_and_exact():
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.dps = 60
    z = np.array([[40.0, 8.0, -3.0], [38.0, 9.0, -2.0], [41.0, 7.5, -4.0]])
    zz, _, _ = combine("fisher", z, two_sided=False)
    assert np.all(np.isfinite(zz))
    for j in range(3):
        x = -2 * sum(mpmath.log(mpmath.ncdf(-mpmath.mpf(v))) for v in z[:, j])
        logp = mpmath.log(mpmath.gammainc(3, x / 2, regularized=True))
        # z = -Phi^{-1}(p), solved in log space with mpmath
        ref = mpmath.findroot(lambda t, lp=logp: mpmath.log(mpmath.ncdf(-t)) - lp, 5)
        assert zz[j] == pytest.approx(float(ref), rel=1e-8), j


# ---------------------------------------------------------------------------------------
# t-test
# ---------------------------------------------------------------------------------------


def test_ttest_matches_scipy(study):
    from nvmeta.images.stats import t_to_z

    rng = np.random.default_rng(3)
    zs = random_maps(rng, 8, study.n_vox, shift=0.6)
    zs[0, :15] = np.nan  # per-voxel k (df = k - 1 there)
    for i, z in enumerate(zs):
        study.add(i + 1, z)
    _, out = study.run("ttest")
    ref = stats.ttest_1samp(zs, 0.0, axis=0, nan_policy="omit")
    t_ref = np.asarray(ref.statistic)
    df = np.sum(np.isfinite(zs), axis=0) - 1.0
    np.testing.assert_allclose(study.vec(out, "z"), t_to_z(t_ref, df), atol=1e-6)
    # the exact conversion keeps the t-test's two-sided p-value
    np.testing.assert_allclose(study.vec(out, "p"), np.asarray(ref.pvalue), rtol=1e-5, atol=1e-10)
    assert study.vec(out, "k")[0] == 7


# ---------------------------------------------------------------------------------------
# permutation
# ---------------------------------------------------------------------------------------


def test_permutation_matches_permuted_ols(study):
    from nilearn.mass_univariate import permuted_ols

    from nvmeta.images.stats import t_to_z

    rng = np.random.default_rng(4)
    zs = random_maps(rng, 9, study.n_vox, shift=0.0)
    zs[:, :40] += 3.0  # a true effect
    zs[2, -5:] = np.nan  # incomplete voxels: left out
    for i, z in enumerate(zs):
        study.add(i + 1, z)
    cfg = {"n_perm": 200, "random_state": 7}
    summary, out = study.run("permutation", cfg)
    full = np.all(np.isfinite(zs), axis=0)
    ref = permuted_ols(
        np.ones((9, 1)),
        np.ascontiguousarray(zs[:, full].astype(np.float32)),
        model_intercept=False,
        n_perm=200,
        two_sided_test=True,
        random_state=7,
        n_jobs=1,
        output_type="dict",
    )
    p_fwe = study.vec(out, "p_fwe")
    np.testing.assert_allclose(p_fwe[full], 10 ** -ref["logp_max_t"].ravel(), rtol=1e-6)  # float32 map
    z = study.vec(out, "z")
    np.testing.assert_allclose(z[full], t_to_z(ref["t"].ravel(), 8), atol=1e-5)
    assert np.all(np.isnan(z[~full])) and np.all(np.isnan(p_fwe[~full]))
    # FWE p-value bounds and monotonicity in |t|
    pf = p_fwe[full]
    assert pf.min() >= 1 / 201 - 1e-12 and pf.max() <= 1
    order = np.argsort(-np.abs(z[full]))
    assert np.all(np.diff(pf[order]) >= -1e-12)
    # FWE never finds more than the parametric uncorrected test at the same alpha
    p = study.vec(out, "p")
    assert np.all(p[full][pf < 0.05] < 0.05)
    z_fwe = study.vec(out, "z_fwe")
    np.testing.assert_array_equal(z_fwe[full] != 0, pf < 0.05)
    assert summary["n_significant_fwe"] == int(np.sum(pf < 0.05)) > 0
    assert (out / "clusters_fwe.tsv").is_file()
    assert any("only some maps" in w for w in summary["warnings"])


def test_permutation_memory_guard(study, monkeypatch):
    rng = np.random.default_rng(5)
    for i, z in enumerate(random_maps(rng, 4, study.n_vox)):
        study.add(i + 1, z)
    need = meta.permutation_memory_bytes(4, study.n_vox, 10)
    monkeypatch.setattr(meta.budget, "available_memory_bytes", lambda: need // 2)
    with pytest.raises(MemoryError, match=r"'permutation' needs about [\d.]+ GiB for 4 maps x \d+ voxels"):
        study.run("permutation", {"n_perm": 10})
    assert not (study.root / "out" / "permutation" / "z.nii.gz").exists()
    assert meta.available_memory_bytes() > 0


def test_permutation_memory_does_not_grow_with_the_maps():
    """The estimate is bounded by the accumulator (1 GiB) plus a block of maps and 9 bytes per map
    and permutation of a pass (int8 and float64): 20,000 maps on the 2 mm mask fit a laptop, where holding the maps x
    voxels matrix (as ``permuted_ols`` does, with a float64 copy per job) would take 18 GB and more."""
    vox = 235375
    est = meta.budget
    assert est.permutations_per_pass(20000, vox) == (1 << 30) // (8 * vox) == 570
    assert (
        not est.maps_in_memory(2000, vox)
        and est.maps_in_memory(285, vox)
        and not est.maps_in_memory(286, vox)
    )
    small, big = meta.permutation_memory_bytes(2000, vox), meta.permutation_memory_bytes(20000, vox)
    assert big - small == 9 * 570 * 18000  # the signs of one pass, nothing else
    assert big < 1.3 * 2**30 < 20000 * vox * 4
    # maps in memory: at most twice the cache, and a small accumulator (35 permutations per pass)
    assert est.permutations_per_pass(285, vox) == (64 << 20) // (8 * vox) == 35
    assert meta.permutation_memory_bytes(285, vox) < 2 * (512 << 20) + 200 * 2**20
    # fewer permutations than a pass: a smaller accumulator
    assert meta.permutation_memory_bytes(2000, vox, 100) < 0.35 * meta.permutation_memory_bytes(
        2000, vox, 1000
    )


def test_permutation_declared_runtime_covers_the_measured_rate_at_any_n_perm():
    """The permutation job's runtime (meta_runtime, workflow/rules/helpers/meta.smk) grows with maps x
    n_perm x voxels. Planted from BENCHMARKS.md (2 threads, 2 mm mask): 2,000 maps x
    1,000 permutations took 139 s, 5,000 maps 335 s. The old declaration, 10 + maps / 20 minutes
    whatever n_perm, gave 110 minutes to 2,000 maps x 100,000 permutations (about 4 h at that
    rate): SLURM would have killed the job."""
    vox = 235_375
    rate = 139 / (2000 * 1000 * vox)  # seconds per map, permutation and voxel
    for n_maps, n_perm in ((2000, 1000), (5000, 1000), (2000, 100_000), (20_000, 10_000), (300, 100_000)):
        measured_min = rate * n_maps * n_perm * vox / 60
        declared = meta.permutation_runtime_minutes(n_maps, vox, n_perm)
        assert 2 * measured_min <= declared <= 10 + 6 * measured_min, (n_maps, n_perm, declared)
    # linear in each factor (beyond the fixed 10 minutes)
    base = meta.permutation_runtime_minutes(20_000, vox, 10_000) - 10
    assert meta.permutation_runtime_minutes(20_000, vox, 20_000) - 10 == pytest.approx(2 * base, abs=1)
    assert meta.permutation_runtime_minutes(20_000, 2 * vox, 10_000) - 10 == pytest.approx(2 * base, abs=1)
    # the demo's size stays at the floor
    assert meta.permutation_runtime_minutes(21, vox, 1000) == 11


@pytest.mark.parametrize("cache", [True, False])
def test_permutation_peak_memory_stays_within_its_estimate(tmp_path, monkeypatch, cache):
    """tracemalloc (numpy reports its buffers to it) measures the fit's peak allocation: it stays within
    the estimate that the rule's mem_mb and the up-front guard use, with several passes of permutations
    (and blocks, when the maps are read again per pass)."""
    import tracemalloc

    study = Study(tmp_path, make_mask((40, 48, 40)))  # big enough for nibabel's fixed buffers not to count
    rng = np.random.default_rng(11)
    n_units = 30
    for i, z in enumerate(random_maps(rng, n_units, study.n_vox)):
        study.add(i + 1, z)
    monkeypatch.setattr(meta.budget, "PERMUTATION_ACC_BYTES", 8 * study.n_vox * 40)  # 40 per pass
    monkeypatch.setattr(meta.budget, "PERMUTATION_CACHED_ACC_BYTES", 8 * study.n_vox * 40)
    monkeypatch.setattr(meta.budget, "PERMUTATION_BLOCK_UNITS", 8)
    if not cache:
        monkeypatch.setattr(meta.budget, "PERMUTATION_CACHE_BYTES", 0)
    real = meta.permutation.Permutation._permute
    seen = {}

    def measured(self, source):
        tracemalloc.start()
        try:
            return real(self, source)
        finally:
            seen["peak"] = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()

    study.run("permutation", {"n_perm": 10, "random_state": 3}, outname="warm-up")  # imports, caches
    monkeypatch.setattr(meta.permutation.Permutation, "_permute", measured)
    summary, _out = study.run("permutation", {"n_perm": 150, "random_state": 3})
    peak = seen["peak"]
    # 150 permutations, 40 per pass: 4 passes, each reading the maps unless they are in memory
    assert summary["passes_over_maps"] == (1 if cache else 4) and summary["maps_in_memory"] is cache
    bound = meta.permutation_memory_bytes(n_units, study.n_vox, 150)
    assert 8 * 40 * study.n_vox < peak <= bound, (peak, bound)


@pytest.mark.parametrize("cache", [True, False])
@pytest.mark.parametrize("two_sided", [True, False])
def test_permutation_in_passes_and_blocks_equals_permuted_ols(study, monkeypatch, two_sided, cache):
    """Several passes (the accumulator holds 37 permutations), with the maps in memory or read again
    per pass in blocks of 4 maps, give exactly the p-values of one ``permuted_ols`` call on the whole
    matrix, both tails."""
    from nilearn.mass_univariate import permuted_ols

    rng = np.random.default_rng(8)
    zs = random_maps(rng, 11, study.n_vox, shift=0.2)
    zs[:, :25] += 1.5
    zs[:, 25:35] -= 2.0
    for i, z in enumerate(zs):
        study.add(i + 1, z)
    monkeypatch.setattr(meta.budget, "PERMUTATION_ACC_BYTES", 8 * study.n_vox * 37)
    monkeypatch.setattr(meta.budget, "PERMUTATION_CACHED_ACC_BYTES", 8 * study.n_vox * 37)
    monkeypatch.setattr(meta.budget, "PERMUTATION_BLOCK_UNITS", 4)
    if not cache:
        monkeypatch.setattr(meta.budget, "PERMUTATION_CACHE_BYTES", 0)
    summary, out = study.run("permutation", {"n_perm": 300, "random_state": 12, "two_sided": two_sided})
    assert summary["passes_over_maps"] == (1 if cache else 9) and summary["maps_in_memory"] is cache
    stored = np.stack([np.asarray(nib.load(study.path(i + 1)).dataobj)[study.mask] for i in range(11)])
    ref = permuted_ols(
        np.ones((11, 1)), stored, model_intercept=False, n_perm=300, two_sided_test=two_sided,
        random_state=12, n_jobs=1, output_type="dict",
    )  # fmt: skip
    # the same count of permutation maxima at or above each voxel's statistic (p_fwe is stored float32)
    counts = np.rint(study.vec(out, "p_fwe") * 301)
    np.testing.assert_array_equal(counts, np.rint(10 ** -ref["logp_max_t"].ravel() * 301))
    np.testing.assert_allclose(study.vec(out, "p_fwe"), counts / 301, rtol=1e-7)
    assert 0 < np.sum(study.vec(out, "p_fwe") < 0.05) < study.n_vox


def _permuted_ols_counts(stored, n_perm, seed, two_sided=True):
    from nilearn.mass_univariate import permuted_ols

    ref = permuted_ols(
        np.ones((len(stored), 1)), stored, model_intercept=False, n_perm=n_perm, two_sided_test=two_sided,
        random_state=seed, n_jobs=1, output_type="dict",
    )  # fmt: skip
    return np.rint(10 ** -ref["logp_max_t"].ravel() * (n_perm + 1))


@pytest.mark.parametrize("cache", [True, False])
def test_permutation_ties_with_the_observed_statistic_count_as_nilearn_counts_them(
    tmp_path, monkeypatch, cache
):
    """A map with z = 0 at the top voxel makes the flips of that map tie with the observed statistic
    there (exactly, in nilearn's one formula; to the last bit or so here, where the observed and
    permuted statistics are summed in different orders): the tie is not counted as below, as in
    nilearn. Several draws, since whether the last bit differs depends on the values."""
    if not cache:
        monkeypatch.setattr(meta.budget, "PERMUTATION_CACHE_BYTES", 0)
        monkeypatch.setattr(meta.budget, "PERMUTATION_BLOCK_UNITS", 3)
    rng = np.random.default_rng(3)
    n_vox = int(np.asarray(make_mask().dataobj).sum())
    for trial in range(17):  # (the draws of trials 9 and 16 tie to within the last bits: run those)
        zs = rng.normal(size=(4, n_vox)) * np.array([[10.0], [0.1], [0.1], [0.1]])
        zs[:, 5] = rng.uniform(4, 6, size=4)
        zs[3, 5] = 0.0  # flipping map 4 leaves the top voxel's statistic unchanged
        if trial not in (9, 16):
            continue
        study = Study(tmp_path / str(trial), make_mask())
        for i, z in enumerate(zs):
            study.add(i + 1, z)
        _summary, out = study.run("permutation", {"n_perm": 200, "random_state": trial})
        stored = np.stack([np.asarray(nib.load(study.path(i + 1)).dataobj)[study.mask] for i in range(4)])
        counts = np.rint(study.vec(out, "p_fwe") * 201)
        ref = _permuted_ols_counts(stored.astype(np.float64), 200, trial)
        np.testing.assert_array_equal(counts, ref, err_msg=f"trial {trial}")


def test_permutation_leaves_out_voxels_where_every_map_has_the_same_abs_z(study, caplog):
    """Where every map has the same |z| (here 2 or -2, and a voxel of zeros), the flips that line the
    signs up give an infinite t (nilearn: inf, or NaN when |b| rounds past 1, which it then skips):
    those voxels are left unreported, and every other voxel's p_fwe is permuted_ols' without them."""
    rng = np.random.default_rng(22)
    zs = rng.normal(size=(5, study.n_vox)) + 0.3
    zs[:, 3] = [2.0, -2.0, 2.0, 2.0, -2.0]
    zs[:, 7] = 0.0
    for i, z in enumerate(zs):
        study.add(i + 1, z)
    with caplog.at_level(logging.WARNING):
        summary, out = study.run("permutation", {"n_perm": 300, "random_state": 9})
    p_fwe = study.vec(out, "p_fwe")
    assert np.isnan(p_fwe[[3, 7]]).all() and np.isnan(study.vec(out, "z")[[3, 7]]).all()
    assert any("2 voxel(s) where every map has the same |z|" in w for w in summary["warnings"])
    keep = np.setdiff1d(np.arange(study.n_vox), [3, 7])
    stored = np.stack([np.asarray(nib.load(study.path(i + 1)).dataobj)[study.mask] for i in range(5)])
    np.testing.assert_array_equal(np.rint(p_fwe[keep] * 301), _permuted_ols_counts(stored[:, keep], 300, 9))


# ---------------------------------------------------------------------------------------
# corrections, clusters
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("two_sided", [True, False])
def test_fdr_and_bonferroni_match_scipy(study, two_sided):
    rng = np.random.default_rng(6)
    zs = random_maps(rng, 6, study.n_vox, shift=0.0)
    zs[:, :60] += 1.5
    zs[:, 60:90] -= 1.5
    for i, z in enumerate(zs):
        study.add(i + 1, z)
    summary, out = study.run("stouffer", {"two_sided": two_sided, "alpha": 0.05})
    z = np.sum(zs, axis=0) / math.sqrt(6)
    p = 2 * stats.norm.sf(np.abs(z)) if two_sided else stats.norm.sf(z)
    np.testing.assert_allclose(study.vec(out, "p"), p, rtol=1e-4, atol=1e-12)
    q = stats.false_discovery_control(p, method="bh")
    np.testing.assert_allclose(study.vec(out, "q"), q, rtol=1e-4, atol=1e-12)
    sig = q < 0.05
    np.testing.assert_array_equal(study.vec(out, "z_fdr") != 0, sig)
    np.testing.assert_allclose(study.vec(out, "z_fdr")[sig], z[sig], atol=1e-5)
    bonf = p < 0.05 / study.n_vox
    np.testing.assert_array_equal(study.vec(out, "z_bonf") != 0, bonf)
    assert summary["n_significant_fdr"] == int(sig.sum()) > 0
    assert summary["n_significant_bonferroni"] == int(bonf.sum())
    assert summary["p_sided"].startswith("two" if two_sided else "one")
    if not two_sided:
        assert not np.any(sig & (z < 0))


def test_clusters_table_planted_blob(tmp_path):
    shape = (20, 24, 20)
    mask_img = make_mask(shape)
    st = Study(tmp_path, mask_img)
    rng = np.random.default_rng(7)
    ijk = np.argwhere(st.mask)
    centre = np.array([13, 8, 11])
    dist2 = np.sum((ijk - centre) ** 2, axis=1)
    signal = 6.0 * np.exp(-dist2 / (2 * 1.5**2))
    for i in range(5):
        st.add(i + 1, rng.normal(scale=0.3, size=len(ijk)) * 0.2 + signal)
    _, out = st.run("stouffer")
    table = pd.read_csv(out / "clusters.tsv", sep="\t")
    assert list(table.columns) == [
        "Cluster ID",
        "X",
        "Y",
        "Z",
        "Peak Stat",
        "Cluster Size (mm3)",
        "Cluster Size (voxels)",
        "Cluster-forming threshold",
        "Connectivity",
    ]
    first = table.iloc[0]
    expected_xyz = AFFINE[:3, :3] @ centre + AFFINE[:3, 3]
    np.testing.assert_allclose([first["X"], first["Y"], first["Z"]], expected_xyz)
    z = st.vec(out, "z")
    assert first["Peak Stat"] == pytest.approx(np.nanmax(z), abs=1e-4)
    n_sig = int(np.sum(st.vec(out, "z_fdr") != 0))
    assert first["Cluster Size (voxels)"] == n_sig  # one blob
    assert first["Cluster Size (mm3)"] == pytest.approx(8.0 * n_sig)


def test_clusters_table_empty_has_header(study):
    n = study.n_vox
    for i in range(3):
        study.add(i + 1, np.full(n, 0.01 * (i - 1)))
    summary, out = study.run("stouffer")
    assert summary["n_significant_fdr"] == 0
    lines = (out / "clusters.tsv").read_text().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Cluster ID\tX\tY\tZ\tPeak Stat")
    assert np.all(study.vec(out, "z_fdr") == 0)


# ---------------------------------------------------------------------------------------
# dependence
# ---------------------------------------------------------------------------------------


def test_combine_within_collection_by_hand(study, caplog):
    n = study.n_vox
    a, b, c = np.full(n, 1.0), np.full(n, 2.0), np.full(n, 3.0)
    b[0] = np.nan  # collection 10 has only map a at voxel 0
    study.add(1, a, collection_id=10)
    study.add(2, b, collection_id=10)
    study.add(3, c, collection_id=20)
    s_col, out = study.run("stouffer", {"combine_within": "collection"})
    u1 = (1 + 2) / math.sqrt(2)
    z = study.vec(out, "z")
    assert z[1] == pytest.approx((u1 + 3.0) / math.sqrt(2), abs=1e-6)
    assert z[0] == pytest.approx((1.0 + 3.0) / math.sqrt(2), abs=1e-6)
    assert s_col["k_units"] == 2 and s_col["k_maps"] == 3
    assert np.all(study.vec(out, "k") == 2)
    # no dependence warning (constant maps make one brain-wide cluster: that warning is expected)
    assert [w for w in s_col["warnings"] if "of the reported voxels" not in w] == []
    # none: every map counts, and the repeated collection is reported
    with caplog.at_level(logging.WARNING):
        s_none = run_method(
            "stouffer", study.qc, study.path, study.mask_img, {}, study.root / "none", logging.getLogger("t")
        )
    assert study.vec(study.root / "none", "z")[1] == pytest.approx(6 / math.sqrt(3), abs=1e-6)
    assert any("collection 10 contributes 2 maps" in w for w in s_none["warnings"])
    assert "collection 10 contributes 2 maps" in caplog.text


def test_excluded_rows_ignored_and_bad_grid(study, tmp_path, caplog):
    n = study.n_vox
    study.add(1, np.full(n, 1.0))
    study.add(2, np.full(n, 2.0))
    study.add(3, np.full(n, 50.0), status="excluded")
    with caplog.at_level(logging.INFO, logger="nvmeta.meta"):
        summary = run_method(
            "stouffer", study.qc, study.path, study.mask_img, {}, tmp_path / "out" / "stouffer"
        )
    out = tmp_path / "out" / "stouffer"
    assert summary["k_maps"] == 2
    np.testing.assert_allclose(study.vec(out, "z"), 3 / math.sqrt(2), atol=1e-6)
    # the module logger (nvmeta.meta.run) reaches the package logger the job's log file hangs on
    assert any(
        r.name == "nvmeta.meta.run" and "stouffer: 2 maps in 2 units" in r.getMessage()
        for r in caplog.records
    )
    # a map off the template grid is an error, not a silent resample
    bad = nib.Nifti1Image(np.zeros((5, 5, 5), np.float32), AFFINE)
    nib.save(bad, study.path(2))
    with pytest.raises(ValueError, match="template grid"):
        study.run("stouffer", outname="bad")
    with pytest.raises(ValueError, match="unknown meta method"):
        study.run("no_such_method")


# ---------------------------------------------------------------------------------------
# sensitivity
# ---------------------------------------------------------------------------------------


def test_sensitivity_dice(tmp_path):
    mask_img = make_mask()
    mask = np.asarray(mask_img.dataobj) > 0
    n = int(mask.sum())

    def write(name, vec):
        d = tmp_path / name
        d.mkdir()
        data = np.full(mask.shape, np.nan, np.float32)
        data[mask] = vec
        nib.save(nib.Nifti1Image(data, AFFINE), d / "z_fdr.nii.gz")
        return d

    a = np.zeros(n)
    a[:10] = 4.0
    b = np.zeros(n)
    b[5:20] = 4.0
    b[0] = -4.0  # opposite sign: not an overlap
    c = np.zeros(n)
    dirs = {"a": write("a", a), "b": write("b", b), "c": write("c", c)}
    table = sensitivity(dirs, mask_img, tmp_path / "sensitivity.tsv")
    back = pd.read_csv(tmp_path / "sensitivity.tsv", sep="\t")
    assert list(back.columns) == ["method_a", "method_b", "dice", "n_a", "n_b"]
    row = table[(table.method_a == "a") & (table.method_b == "b")].iloc[0]
    assert (row.n_a, row.n_b) == (10, 16)
    assert row.dice == pytest.approx(2 * 5 / 26)
    diag = table[table.method_a == table.method_b].set_index("method_a")
    assert diag.loc["a", "n_a"] == 10 and diag.loc["c", "n_a"] == 0
    assert table[(table.method_a == "a") & (table.method_b == "c")].iloc[0].dice == 0.0
    assert np.isnan(diag.loc["c", "dice"])
    assert len(table) == 6


# ---------------------------------------------------------------------------------------
# figures
# ---------------------------------------------------------------------------------------


def test_glass_brain_grid_and_layout(tmp_path):
    import matplotlib.image as mpimg

    from nvmeta.figures.plotting import glass_brain_grid, grid_shape

    mask_img = make_mask((30, 36, 30))
    st = Study(tmp_path, mask_img)
    rng = np.random.default_rng(8)
    for i in range(3):
        st.add(i + 1, rng.normal(scale=3, size=st.n_vox))
    items = [(i + 1, "a long contrast name " * 5 if i else None, st.path(i + 1)) for i in range(3)]
    out = glass_brain_grid(items, tmp_path / "fig" / "inputs_glass_brain.png")
    img = mpimg.imread(out)
    assert img.shape[0] > 100 and img.shape[1] > 300
    assert img[..., :3].std() > 0.05  # not blank
    assert grid_shape(1) == (1, 1, "ortho")
    assert grid_shape(21)[:2] == (4, 6)
    ncols, nrows, mode = grid_shape(100)
    assert mode == "z" and ncols * nrows >= 100 and ncols <= 10


# ---------------------------------------------------------------------------------------
# real data: 21 pain studies (NeuroVault collection 1425)
# ---------------------------------------------------------------------------------------


def _onto_grid(data: np.ndarray, src_affine: np.ndarray, mask_img: nib.Nifti1Image) -> np.ndarray:
    """Exact nearest-neighbour copy onto a grid with the same voxel centres (flips/shifts)."""
    m = np.linalg.inv(src_affine) @ mask_img.affine
    ijk = np.indices(mask_img.shape).reshape(3, -1)
    src = m[:3, :3] @ ijk + m[:3, 3:4]
    assert np.allclose(src, np.round(src)), "grids do not share voxel centres"
    src = np.round(src).astype(int)
    ok = np.all((src >= 0) & (src < np.array(data.shape)[:, None]), axis=0)
    out = np.full(ijk.shape[1], np.nan, np.float32)
    out[ok] = data[src[0, ok], src[1, ok], src[2, ok]]
    return out.reshape(mask_img.shape)


@pytest.fixture(scope="module")
def pain_study(tmp_path_factory):
    from nvmeta.images.stats import t_to_z
    from nvmeta.images.template import load_mask

    files = pain_maps()
    assert len(files) == 21, files
    mask_img = load_mask("mni152_2mm")
    root = tmp_path_factory.mktemp("pain")
    st = Study(root, mask_img)
    for i, (f, n) in enumerate(files):
        img = nib.load(f)
        assert img.shape == (91, 109, 91)  # LAS 2 mm grid: differs from nilearn's mask grid
        t = np.asarray(img.dataobj, dtype=np.float64)
        z = t_to_z(t, n - 1).astype(np.float32)
        z[t == 0] = np.nan  # 0 = outside the study's mask
        z = _onto_grid(z, img.affine, mask_img)
        st.add(1000 + i, z[st.mask], collection_id=1425, n=n)
    return st


def _near(table: pd.DataFrame, xyz, radius: float) -> pd.DataFrame:
    d = np.sqrt(((table[["X", "Y", "Z"]].to_numpy(float) - np.asarray(xyz, float)) ** 2).sum(axis=1))
    return table[(d <= radius) & (table["Peak Stat"] > 0)]


def test_pain21_network_peaks(pain_study):
    s_st, out_st = pain_study.run("stouffer")
    s_tt, out_tt = pain_study.run("ttest")
    tables = {
        "stouffer fdr": pd.read_csv(out_st / "clusters.tsv", sep="\t"),
        "ttest fdr": pd.read_csv(out_tt / "clusters.tsv", sep="\t"),
        "ttest bonferroni": pd.read_csv(out_tt / "clusters_bonf.tsv", sep="\t"),
    }
    with pd.option_context("display.width", 200, "display.max_rows", 40):
        for name, table in tables.items():
            print(f"\n== pain21 {name}\n{table.head(16).to_string(index=False)}")
    st = tables["stouffer fdr"]
    # the strongest positive peak of the Stouffer map is in the (right) insula / operculum
    top = st.iloc[0]
    assert 28 <= abs(top["X"]) <= 46 and -10 <= top["Y"] <= 20 and -10 <= top["Z"] <= 14, top.to_dict()
    assert top["Peak Stat"] > 12
    allpeaks = pd.concat(tables.values(), ignore_index=True)
    # secondary somatosensory / parietal operculum (right)
    assert len(_near(allpeaks, (52, -24, 20), 12)) > 0
    # anterior / mid cingulate
    acc = allpeaks[(allpeaks.X.abs() <= 10) & allpeaks.Y.between(-15, 30) & allpeaks.Z.between(15, 50)]
    assert len(acc[acc["Peak Stat"] > 5]) > 0
    # thalamus
    thal = allpeaks[
        allpeaks.X.abs().between(2, 20) & allpeaks.Y.between(-30, -4) & allpeaks.Z.between(-4, 16)
    ]
    assert len(thal[thal["Peak Stat"] > 5]) > 0
    # left insula too (bilateral)
    assert len(_near(allpeaks, (-38, 0, 8), 12)) > 0
    # and the summary says the 21 maps share one collection
    assert s_st["k_maps"] == 21 and any("1425 contributes 21 maps" in w for w in s_st["warnings"])
    assert 0.95 < s_st["n_voxels_reported"] / s_st["n_voxels_mask"] <= 1


@pytest.mark.parametrize("n_included", [0, 1])
@pytest.mark.parametrize("method", ["stouffer", "weighted_stouffer", "fisher", "ttest", "permutation"])
def test_too_few_maps_reports_nothing_instead_of_failing(tmp_path, method, n_included):
    """QC can exclude every image of an analysis: the fan-in still writes its outputs, empty."""
    mask = nib.Nifti1Image(np.ones((6, 6, 6), np.uint8), np.eye(4))
    z = np.random.default_rng(1).normal(size=(6, 6, 6)).astype(np.float32)
    nib.save(nib.Nifti1Image(z, np.eye(4)), tmp_path / "z1.nii.gz")
    (tmp_path / "qc.json").write_text(json.dumps({"n": 10}))  # resolved n, next to the z-map
    rows = [dict(image_id=1, collection_id=1, number_of_subjects=10, status="included")][:n_included]
    cols = ["image_id", "collection_id", "number_of_subjects", "status"]
    pd.DataFrame(rows, columns=cols).to_csv(tmp_path / "qc.tsv", sep="\t", index=False)
    out = tmp_path / "out"
    run_method(
        method,
        tmp_path / "qc.tsv",
        lambda i: tmp_path / f"z{i}.nii.gz",
        mask,
        {"n_perm": 20, "cut_coords": [1, 2, 3]},
        out,
    )
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_voxels_reported"] == 0
    assert any("nothing reported" in w for w in summary["warnings"]), summary["warnings"]
    assert np.isnan(nib.load(out / "z.nii.gz").get_fdata()).all()
    assert nib.load(out / "k.nii.gz").get_fdata().max() == n_included
    assert pd.read_csv(out / "clusters.tsv", sep="\t").empty


def test_inputs_from_qc_titles_and_order(tmp_path):
    """Included rows only, in order; the title falls back from contrast to name (empty cells)."""
    from nvmeta.figures.plotting import inputs_from_qc

    pd.DataFrame(
        [
            dict(image_id=3, status="included", contrast_definition="pain vs rest", name="a"),
            dict(image_id=1, status="excluded", contrast_definition="x", name="b"),
            dict(image_id=2, status="included", contrast_definition=None, name="map two"),
            dict(image_id=5, status="included", contrast_definition=None, name=None),
        ]
    ).to_csv(tmp_path / "qc.tsv", sep="\t", index=False)
    items = inputs_from_qc(tmp_path / "qc.tsv", lambda i: tmp_path / f"{i}.nii.gz")
    assert items == [
        (3, "pain vs rest", tmp_path / "3.nii.gz"),
        (2, "map two", tmp_path / "2.nii.gz"),
        (5, None, tmp_path / "5.nii.gz"),
    ]
