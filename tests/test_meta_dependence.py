"""``meta.dependence: cluster_robust``: inference that knows the maps of one collection are dependent.

References: PyMARE's ``cluster_robust_cov(method="CR2")`` and ``satterthwaite_dof`` (the functions
behind NiMARE's ``groupby=``), NiMARE's ``WeightedLeastSquares`` / ``FixedEffectsHedges`` /
``DerSimonianLaird`` / ``Hedges`` with ``groupby`` and ``weight_scheme="individual"`` on the same
maps, scipy's one-sample t-test, a brute-force whole-collection sign-flip test, refits without a
map (the jackknife), and planted truth: maps correlated within collections under the null, whose
false-positive rate the naive methods inflate and the cluster-robust ones keep at α.
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

from nvmeta.errors import ConfigError
from nvmeta.images.effectsize import write_effect_maps
from nvmeta.images.stats import t_to_z
from nvmeta.meta import dependence, frozen_gc, run_method
from nvmeta.meta.permutation import _nilearn_sign_flips
from nvmeta.meta.registry import get_estimator
from nvmeta.meta.run import _complete
from nvmeta.testing.dependent_maps import ArraySource, simulate
from nvmeta.workflow.config import check_config, defaults

REPO = Path(__file__).resolve().parents[1]
SCHEMA = REPO / "workflow" / "schemas" / "config.schema.yaml"
AFFINE = np.array([[3.0, 0, 0, -15], [0, 3.0, 0, -15], [0, 0, 3.0, -9], [0, 0, 0, 1]])
SHAPE = (8, 8, 6)
CR = {"dependence": "cluster_robust"}


class DepStudy:
    """Per image (as the z-map job writes them): zmap.nii.gz of a one-sample t, g.nii.gz, varg.nii.gz,
    qc.json; and the analysis' qc.tsv with each image's collection."""

    def __init__(self, root: Path):
        self.root = root
        m = np.zeros(SHAPE, np.uint8)
        m[1:-1, 1:-1, 1:-1] = 1
        self.mask_img = nib.Nifti1Image(m, AFFINE)
        self.mask = m > 0
        self.rows: list[dict] = []

    @property
    def n_vox(self) -> int:
        return int(self.mask.sum())

    def add(self, image_id: int, t: np.ndarray, n: int, collection_id: int) -> None:
        d = self.root / "images" / str(image_id)
        d.mkdir(parents=True, exist_ok=True)
        z = np.full(SHAPE, np.nan, np.float32)
        z[self.mask] = t_to_z(np.asarray(t, np.float64), n - 1.0)
        nib.save(nib.Nifti1Image(z, AFFINE), d / "zmap.nii.gz")
        tv = np.full(SHAPE, np.nan, np.float32)
        tv[self.mask] = t
        nib.save(nib.Nifti1Image(tv, AFFINE), d / "t.nii.gz")
        qc = {"image_id": image_id, "collection_id": collection_id, "n": n, "df": n - 1.0}
        write_effect_maps(z, qc, {}, defaults("conversion"), self.mask_img, d / "g.nii.gz", d / "varg.nii.gz")
        (d / "qc.json").write_text(json.dumps(qc))
        self.rows.append({"image_id": image_id, "collection_id": collection_id, "number_of_subjects": n,
                          "status": "included"})  # fmt: skip

    def path(self, image_id: int, name: str = "zmap") -> Path:
        return self.root / "images" / str(image_id) / f"{name}.nii.gz"

    def run(self, method: str, cfg: dict | None = None, outname: str | None = None, rows=None):
        qc = self.root / f"qc_{outname or method}.tsv"
        pd.DataFrame(self.rows if rows is None else rows).to_csv(qc, sep="\t", index=False)
        out = self.root / "out" / (outname or method)
        cfg = {"cut_coords": [0, 3], "threshold": 2.0, **(cfg or {})}
        return run_method(method, qc, self.path, self.mask_img, cfg, out), out

    def vec(self, out: Path, name: str) -> np.ndarray:
        return np.asarray(nib.load(out / f"{name}.nii.gz").dataobj, dtype=np.float64)[self.mask]


def dependent_study(
    root: Path, seed: int = 3, sizes=(1, 2, 3, 4, 2, 3, 1, 4, 2, 3, 2, 1), rho=0.6, effect=0.0
):
    """A DepStudy of len(sizes) collections (sizes[j] maps each) correlated within at ``rho``, with a
    planted standardised effect in the lower half of the mask."""
    st = DepStudy(root)
    rng = np.random.default_rng(seed)
    image_id = 1
    signal = np.arange(st.n_vox) < st.n_vox // 2  # the lower slabs of the mask: one cluster
    for j, m in enumerate(sizes):
        n = int(rng.integers(15, 45))
        u = rng.normal(size=st.n_vox)
        for _ in range(m):
            t = (
                math.sqrt(rho) * u
                + math.sqrt(1 - rho) * rng.normal(size=st.n_vox)
                + effect * math.sqrt(n) * signal
            )
            st.add(image_id, t, n, collection_id=500 + j)
            image_id += 1
    return st


# ---------------------------------------------------------------------------------------
# the sandwich against PyMARE, and by hand
# ---------------------------------------------------------------------------------------


def _pymare_cr2(y, w, groups):
    from pymare.stats import cluster_robust_cov, satterthwaite_dof, weighted_least_squares

    x = np.ones((len(y), 1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        beta, cov = weighted_least_squares(y[:, None], 1.0 / w[:, None], x, return_cov=True, w=w[:, None])
        robust = cluster_robust_cov(
            y[:, None], 1.0 / w[:, None], x, beta, groups, w=w[:, None], model_cov=cov
        )
        df = satterthwaite_dof(x, w[:, None], groups)
    return float(beta[0, 0]), math.sqrt(robust[0, 0, 0]), float(df[0, 0])


def test_cr2_matches_pymare_sandwich_and_satterthwaite():
    rng = np.random.default_rng(11)
    collections = [7, 7, 7, 3, 3, 9, 12, 12, 12, 12, 4, 5, 5]  # sizes 3, 2, 1, 4, 1, 2
    k, n = len(collections), 40
    from nvmeta.meta.units import plan_units

    rows = pd.DataFrame({"image_id": np.arange(1, k + 1), "collection_id": np.asarray(collections, float),
                         "number_of_subjects": np.nan, "status": "included"})  # fmt: skip
    clusters = dependence.clusters_of(plan_units(rows, "none", dependence="cluster_robust"))
    assert clusters.n == 6 and list(clusters.codes[:6]) == [0, 0, 0, 1, 1, 2]
    y = rng.normal(size=(k, n)) + 0.3
    w = rng.uniform(0.2, 3.0, size=(k, n))
    y[0, :5] = np.nan  # missing data: the unit is left out at those voxels
    y[5, 5:10] = np.nan  # collection 9's only map: 5 clusters there
    y[3:5, 10:12] = np.nan
    res = dependence.cr2_intercept(y, w, clusters)
    for j in range(n):
        keep = np.isfinite(y[:, j])
        est, se, df = _pymare_cr2(y[keep, j], w[keep, j], np.asarray(collections)[keep])
        assert res["est"][j] == pytest.approx(est, rel=1e-12)
        assert res["se"][j] == pytest.approx(se, rel=1e-12)
        assert res["df"][j] == pytest.approx(df, rel=1e-12)
        assert res["n_clusters"][j] == len(set(np.asarray(collections)[keep]))
        # z is the normal deviate of the two-sided Student-t p-value
        p = 2 * stats.t.sf(abs(est / se), df)
        assert 2 * stats.norm.sf(abs(res["z"][j])) == pytest.approx(p, rel=1e-9)
    # one weight per unit (the z methods) broadcasts as a column
    w1 = rng.uniform(0.5, 2.0, size=k)
    res1 = dependence.cr2_intercept(y, w1, clusters)
    est, se, df = _pymare_cr2(y[:, 20], w1, np.asarray(collections))
    assert (res1["se"][20], res1["df"][20]) == (pytest.approx(se, rel=1e-12), pytest.approx(df, rel=1e-12))


def test_balanced_collections_have_g_minus_1_df_and_singletons_give_the_t_test():
    rng = np.random.default_rng(5)
    g, m, n = 9, 3, 30
    clusters = dependence.Clusters(np.repeat(np.arange(g), m), [f"c{j}" for j in range(g)],
                                   np.arange(g * m), np.arange(0, g * m, m))  # fmt: skip
    res = dependence.cr2_intercept(rng.normal(size=(g * m, n)), np.ones(g * m), clusters)
    np.testing.assert_allclose(res["df"], g - 1, rtol=1e-12)
    # one map per collection, equal weights: CR2 is HC2, i.e. exactly the one-sample t-test
    y = rng.normal(size=(12, n)) + 0.4
    single = dependence.Clusters(np.arange(12), [f"c{j}" for j in range(12)], np.arange(12), np.arange(12))
    res = dependence.cr2_intercept(y, np.ones(12), single)
    ref = stats.ttest_1samp(y, 0.0, axis=0)
    np.testing.assert_allclose(res["est"] / res["se"], ref.statistic, rtol=1e-12)
    np.testing.assert_allclose(res["df"], 11, rtol=1e-12)
    np.testing.assert_allclose(2 * stats.norm.sf(np.abs(res["z"])), ref.pvalue, rtol=1e-9)


# ---------------------------------------------------------------------------------------
# planted truth: the false-positive rate under dependence
# ---------------------------------------------------------------------------------------

PARAMETRIC = ["stouffer", "weighted_stouffer", "ttest", "fixed_effects_hedges", "dersimonian_laird", "hedges"]


def _fpr(maps, method, cfg, tmp_path) -> float:
    est = get_estimator(method)(cfg, workdir=tmp_path)
    try:
        fit = est.fit(ArraySource(maps, str(cfg["dependence"])), 2)
    finally:
        est.close()
    assert fit.reported.all()
    return float(np.mean(np.exp(fit.logp) < 0.05))


def test_false_positive_rate_naive_vs_cluster_robust(tmp_path):
    """20 collections x 4 maps, rho = 0.6, 20,000 null voxels (each a replication): the naive methods
    reject at 0.20-0.25, the cluster-robust ones at 0.05 +- 0.01 (the standard error of a rate near
    0.05 over 20,000 voxels is 0.0015; CR2 with 20 collections is biased by less than 0.005)."""
    maps = simulate(np.random.default_rng(20260), 20, 4, 0.6, 20_000)
    naive, robust = _complete({"jackknife": False}), _complete({"jackknife": False, **CR})
    for method in PARAMETRIC:
        fpr_naive = _fpr(maps, method, naive, tmp_path)
        fpr_cr = _fpr(maps, method, robust, tmp_path)
        assert fpr_naive > 0.15, (method, fpr_naive)
        assert abs(fpr_cr - 0.05) < 0.01, (method, fpr_cr)
    # without dependence the option costs nothing in level
    indep = simulate(np.random.default_rng(20261), 20, 4, 0.0, 20_000)
    for method in ("stouffer", "dersimonian_laird"):
        assert abs(_fpr(indep, method, robust, tmp_path) - 0.05) < 0.01


def test_planted_effect_is_recovered_with_honest_intervals(tmp_path):
    """A planted standardised effect 0.3 in correlated maps: the estimate is unbiased and the CR2
    interval covers it about 95 % of the time (the model-based one far less often)."""
    maps = simulate(np.random.default_rng(7), 20, 4, 0.6, 20_000, effect=0.3)
    cover = {}
    for dep in ("none", "cluster_robust"):
        cfg = _complete({"jackknife": False, "dependence": dep})
        est = get_estimator("fixed_effects_hedges")(cfg, workdir=tmp_path)
        fit = est.fit(ArraySource(maps, dep), 2)
        est.close()
        g, se = fit.maps["est"], fit.maps["se"]
        # Hedges' J(n) shrinks g slightly below d = 0.3 (0.95-0.99 for n = 15-60)
        assert abs(np.mean(g) - 0.3) < 0.02
        df = np.asarray(fit.summary.get("df_median", np.inf))
        half = stats.t.ppf(0.975, df) * se
        cover[dep] = float(np.mean(np.abs(g - np.mean(g)) <= half))
    assert cover["none"] < 0.85 and abs(cover["cluster_robust"] - 0.95) < 0.015, cover


def test_whole_collection_sign_flips_control_the_fwer(tmp_path):
    """The family-wise error rate of the permutation test over 10 null voxels, 12 collections of
    3 maps at rho = 0.6: above 0.3 when maps are flipped one by one, 0.05 (binomial 95 % range over
    200 replications: 0.02-0.08) when whole collections are."""
    rng = np.random.default_rng(99)
    rates = {}
    for dep, reps in (("none", 60), ("cluster_robust", 200)):
        hits = 0
        for r in range(reps):
            maps = simulate(rng, 12, 3, 0.6, 10)
            cfg = _complete({"jackknife": False, "n_perm": 99, "random_state": r, "dependence": dep})
            est = get_estimator("permutation")(cfg, workdir=tmp_path)
            fit = est.fit(ArraySource(maps, dep), 2)
            est.close()
            hits += bool(np.any(fit.p_fwe[fit.reported] < 0.05))
        rates[dep] = hits / reps
    assert rates["none"] > 0.3 and 0.015 <= rates["cluster_robust"] <= 0.09, rates


# ---------------------------------------------------------------------------------------
# whole method runs: NiMARE on the same maps, the permutation test by brute force
# ---------------------------------------------------------------------------------------


def _nimare_dataset(st: DepStudy, images):
    from nimare.dataset import Dataset

    source = {}
    for row in st.rows:
        i = row["image_id"]
        source[f"s{i:03d}"] = {"contrasts": {"1": {
            "images": {k: str(v) for k, v in images(i).items()},
            "metadata": {"sample_sizes": [row["number_of_subjects"]], "collection": row["collection_id"]},
        }}}  # fmt: skip
    with warnings.catch_warnings(), frozen_gc():
        warnings.simplefilter("ignore")
        return Dataset(source, target=None, mask=st.mask_img)


def test_matches_nimare_groupby_on_the_same_maps(tmp_path):
    from nimare.meta.ibma import DerSimonianLaird, FixedEffectsHedges, Hedges, WeightedLeastSquares

    st = dependent_study(tmp_path, effect=0.25)
    # weights as the z methods': 1 (stouffer: varcope 1) and sqrt(n) (weighted_stouffer: varcope 1/sqrt(n))
    for row in st.rows:
        n = row["number_of_subjects"]
        for name, value in (("one", 1.0), ("isqrtn", 1.0 / math.sqrt(n))):
            nib.save(nib.Nifti1Image(np.where(st.mask, value, 0).astype(np.float32), AFFINE),
                     st.path(row["image_id"], name))  # fmt: skip
    zset = _nimare_dataset(
        st, lambda i: {"beta": st.path(i), "varcope": st.path(i, "one"), "t": st.path(i, "t")}
    )
    wset = _nimare_dataset(st, lambda i: {"beta": st.path(i), "varcope": st.path(i, "isqrtn")})
    gset = _nimare_dataset(st, lambda i: {"beta": st.path(i, "g"), "varcope": st.path(i, "varg")})
    kw = {"groupby": "collection", "weight_scheme": "individual"}
    cases = [
        ("stouffer", WeightedLeastSquares(tau2=0, **kw), zset),
        ("weighted_stouffer", WeightedLeastSquares(tau2=0, **kw), wset),
        ("fixed_effects_hedges", FixedEffectsHedges(**kw), zset),
        ("dersimonian_laird", DerSimonianLaird(**kw), gset),
        ("hedges", Hedges(**kw), gset),
    ]
    for method, estimator, dset in cases:
        with warnings.catch_warnings(), frozen_gc():  # nilearn collects garbage per image
            warnings.simplefilter("ignore")
            res = estimator.fit(dset)
        summary, out = st.run(method, {**CR, "jackknife": False}, outname=f"{method}-cr")
        ref = {
            name: np.asarray(res.get_map(name).dataobj, np.float64)[st.mask] for name in ("z", "dof", "se")
        }
        np.testing.assert_allclose(st.vec(out, "z"), ref["z"], atol=2e-4, err_msg=method)
        assert summary["df_median"] == pytest.approx(float(np.median(ref["dof"])), rel=1e-4), method
        assert summary["n_collections"] == 12 and summary["dependence"] == "cluster_robust"
        if method in ("fixed_effects_hedges", "dersimonian_laird", "hedges"):
            np.testing.assert_allclose(st.vec(out, "se"), ref["se"], rtol=2e-4, err_msg=method)
            # the estimate is the method's own: only its inference changes
            _, naive = st.run(method, {"jackknife": False}, outname=f"{method}-none")
            np.testing.assert_array_equal(st.vec(out, "est"), st.vec(naive, "est"))


def test_permutation_flips_whole_collections(tmp_path):
    st = dependent_study(tmp_path, seed=4, effect=0.35)
    cfg = {**CR, "n_perm": 60, "random_state": 3}
    summary, out = st.run("permutation", cfg)
    # brute force: the collections' flips (nilearn's permuted_ols(n_jobs=1) scheme, tested against
    # nilearn in test_meta.py), each map given its collection's sign, max |t| over the voxels
    y = np.stack([st.vec(st.path(r["image_id"]).parent, "zmap") for r in st.rows])
    cols = [r["collection_id"] for r in st.rows]
    codes = np.unique(cols, return_inverse=True)[1]  # collections 500.. are in first-seen order here
    k = len(y)

    def t_of(s):
        yy = s[:, None] * y
        return yy.mean(0) / (yy.std(0, ddof=1) / math.sqrt(k))

    t0 = np.abs(t_of(np.ones(k)))
    maxima = np.array([np.abs(t_of(f[codes].astype(float))).max() for f in _nilearn_sign_flips(3, 12, 60)])
    p_ref = (1 + (maxima[None, :] >= t0[:, None] - 1e-10 * t0[:, None]).sum(1)) / 61.0
    np.testing.assert_allclose(st.vec(out, "p_fwe"), p_ref, rtol=1e-6)  # float32 map
    assert summary["permutation_blocks"] == 12 and summary["permutation_smallest_p"] == 2 / 2**12
    # the parametric z is ttest's cluster-robust one, and so is its jackknife
    _, tt = st.run("ttest", CR)
    np.testing.assert_array_equal(st.vec(out, "z"), st.vec(tt, "z"))
    jk, jk_tt = (pd.read_csv(d / "jackknife.tsv", sep="\t") for d in (out, tt))
    assert len(jk) == len(st.rows) * summary["n_clusters_fdr"] > 0
    pd.testing.assert_frame_equal(jk, jk_tt)
    # with one map per collection the whole-collection flips are the flips of the maps
    cfg["jackknife"] = False
    one = [dict(r, collection_id=r["image_id"]) for r in st.rows]
    _, a = st.run("permutation", cfg, outname="one-cr", rows=one)
    _, b = st.run("permutation", {**cfg, "dependence": "none"}, outname="one-none", rows=one)
    np.testing.assert_array_equal(st.vec(a, "p_fwe"), st.vec(b, "p_fwe"))


def test_few_collections_warn_and_nothing_can_be_fwe_significant(tmp_path):
    st = dependent_study(tmp_path, sizes=(3, 2, 4, 2), effect=0.8)
    summary, _ = st.run("permutation", {**CR, "n_perm": 50, "jackknife": False})
    assert summary["permutation_smallest_p"] == 2 / 16 and summary["n_significant_fwe"] == 0
    assert any("cannot give a p below 0.125" in w for w in summary["warnings"])
    assert any("only 4 collection(s)" in w and "anticonservative" in w for w in summary["warnings"])
    assert not any("treated as independent" in w for w in summary["warnings"])


def test_voxels_seen_by_one_collection_are_not_reported(tmp_path):
    st = DepStudy(tmp_path)
    rng = np.random.default_rng(1)
    for i in range(12):
        t = rng.normal(size=st.n_vox) + 1.0
        if i >= 3:
            t[:10] = np.nan  # voxels 0-9: maps 1-3 only, all of collection 1
        st.add(i + 1, t, 30, collection_id=1 + max(0, i - 2))
    summary, out = st.run("stouffer", CR)
    z = st.vec(out, "z")
    assert np.isnan(z[:10]).all() and np.isfinite(z[10:]).all()
    assert any("10 voxel(s) with data from a single collection" in w for w in summary["warnings"])
    assert summary["collections_per_voxel_min"] == 10


def test_jackknife_is_a_refit_without_the_map(tmp_path):
    st = dependent_study(tmp_path, seed=8, effect=0.6)
    for method in ("stouffer", "dersimonian_laird"):
        summary, out = st.run(method, CR, outname=method)
        jk = pd.read_csv(out / "jackknife.tsv", sep="\t")
        assert len(jk), method
        from nvmeta.meta import outputs

        labels, _ = outputs.cluster_labels(st.vec(out, "z_fdr"), st.mask, AFFINE, 10)
        for image_id in (2, 9):
            row = jk[(jk["unit"] == f"image {image_id}") & (jk["cluster"] == 1)].iloc[0]
            rows = [r for r in st.rows if r["image_id"] != image_id]
            _, loo = st.run(method, {**CR, "jackknife": False}, outname=f"{method}-{image_id}", rows=rows)
            # the refit's z, read back from float32, averaged over the cluster's voxels
            ref = float(np.nanmean(st.vec(loo, "z")[labels == 1]))
            assert row["z_mean_without"] == pytest.approx(ref, abs=2e-5), (method, image_id)
            assert row["size_voxels"] == int(np.sum(labels == 1))


# ---------------------------------------------------------------------------------------
# config
# ---------------------------------------------------------------------------------------


def test_methods_without_a_sandwich_are_refused(tmp_path):
    cfg = {
        "neurovault": {"url": "https://neurovault.org/api/"},
        "analyses": {"a": {"image_ids": [1, 2], "meta": {"methods": ["stouffer", "fisher", "median"], **CR}}},
    }
    with pytest.raises(ConfigError) as info:
        check_config(cfg, SCHEMA)
    msg = str(info.value)
    assert "analyses.a.meta.dependence: 'cluster_robust' cannot be applied to method 'fisher'" in msg
    assert "method 'median'" in msg and "Fix: drop 'fisher' from analyses.a.meta.methods" in msg
    ok = check_config(
        {**cfg, "analyses": {"a": {"image_ids": [1], "meta": {"methods": ["stouffer"], **CR}}}}, SCHEMA
    )
    assert ok["analyses"]["a"]["meta"]["dependence"] == "cluster_robust"
    assert check_config({**cfg, "analyses": {"a": {"image_ids": [1], "meta": {}}}}, SCHEMA)["analyses"]["a"][
        "meta"]["dependence"] == "none"  # fmt: skip
    st = dependent_study(tmp_path, sizes=(1, 1, 1))
    with pytest.raises(ValueError, match="cannot be applied to 'fisher'"):
        st.run("fisher", CR)


def test_naive_run_still_warns_about_collections(tmp_path, caplog):
    st = dependent_study(tmp_path, sizes=(2, 1, 3))
    with caplog.at_level(logging.WARNING):
        summary, _ = st.run("stouffer", {"jackknife": False})
    assert sum("treated as independent" in w for w in summary["warnings"]) == 2
    assert "dependence" not in summary  # the default's summary.json has no new entries


def test_every_meta_key_reaches_the_meta_jobs():
    """run_method fills a key its rule does not pass from the schema's default, so a key missing from
    helpers/meta.smk's META_*_KEYS would be silently ignored (dependence: cluster_robust run as none)."""
    import ast
    import re

    from nvmeta.workflow.config import defaults

    text = (REPO / "workflow" / "rules" / "helpers" / "meta.smk").read_text()
    passed = set()
    for body in re.findall(r"^META_\w+_KEYS = (\[.*?\])", text, flags=re.M | re.S):
        passed |= set(ast.literal_eval(body))
    meta_keys = set(defaults("meta"))
    assert "dependence" in passed
    assert meta_keys - {"methods"} <= passed, meta_keys - {"methods"} - passed
