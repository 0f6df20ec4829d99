"""Effect sizes (nvmeta.images.effectsize) and the effect-size meta-analysis methods (nvmeta.meta.effects).

References: NiMARE's ``nimare.transforms`` (t -> d -> g, var g; z -> t) and ``FixedEffectsHedges``,
PyMARE's ``DerSimonianLaird`` / ``Hedges`` (Wald inference, the textbook form), an independent
per-voxel DerSimonian–Laird written here, numpy / scipy robust statistics, a 3-study example
computed by hand, and planted truth.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from scipy import stats

from nvmeta.images.effectsize import hedges_j, one_sample, two_sample, write_effect_maps, z_to_t
from nvmeta.images.stats import t_to_z
from nvmeta.meta import run_method
from nvmeta.meta.effects import pool
from nvmeta.workflow.config import defaults

AFFINE = np.array([[3.0, 0, 0, -15], [0, 3.0, 0, -15], [0, 0, 3.0, -9], [0, 0, 0, 1]])
SHAPE = (10, 10, 6)


def small_mask() -> nib.Nifti1Image:
    m = np.zeros(SHAPE, np.uint8)
    m[1:-1, 1:-1, 1:-1] = 1
    return nib.Nifti1Image(m, AFFINE)


class EffectStudy:
    """Per image: zmap.nii.gz, g.nii.gz, varg.nii.gz, qc.json (as the z-map job writes them); qc.tsv."""

    def __init__(self, root: Path):
        self.root = root
        self.mask_img = small_mask()
        self.mask = np.asarray(self.mask_img.dataobj) > 0
        self.rows: list[dict] = []

    @property
    def n_vox(self) -> int:
        return int(self.mask.sum())

    def add_t(self, image_id: int, t: np.ndarray, n: int, collection_id: int | None = None) -> None:
        """One one-sample t map (mask-voxel vector) with sample size n: z with df = n - 1, g, var g."""
        d = self.root / "images" / str(image_id)
        d.mkdir(parents=True, exist_ok=True)
        z = np.full(SHAPE, np.nan, np.float32)
        z[self.mask] = t_to_z(np.asarray(t, np.float64), n - 1.0)
        nib.save(nib.Nifti1Image(z, AFFINE), d / "zmap.nii.gz")
        qc = {"image_id": image_id, "collection_id": collection_id or image_id, "n": n, "df": n - 1.0}
        write_effect_maps(z, qc, {}, defaults("conversion"), self.mask_img, d / "g.nii.gz", d / "varg.nii.gz")
        (d / "qc.json").write_text(json.dumps(qc))
        self.rows.append(
            {"image_id": image_id, "collection_id": collection_id or image_id, "number_of_subjects": n,
             "status": "included"}
        )  # fmt: skip

    def path(self, image_id: int) -> Path:
        return self.root / "images" / str(image_id) / "zmap.nii.gz"

    def run(self, method: str, cfg: dict | None = None, outname: str | None = None, rows=None):
        qc = self.root / f"qc_{outname or method}.tsv"
        pd.DataFrame(self.rows if rows is None else rows).to_csv(qc, sep="\t", index=False)
        out = self.root / "out" / (outname or method)
        cfg = {"cut_coords": [0, 3], "threshold": 2.0, **(cfg or {})}
        return run_method(method, qc, self.path, self.mask_img, cfg, out), out

    def vec(self, out: Path, name: str) -> np.ndarray:
        return np.asarray(nib.load(out / f"{name}.nii.gz").dataobj, dtype=np.float64)[self.mask]


# ---------------------------------------------------------------------------------------
# per-image effect sizes
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [5, 12, 20, 57, 400])
def test_one_sample_matches_nimare_transforms(n):
    from nimare.transforms import d_to_g, t_to_d

    t = np.array([-12.0, -3.1, -0.4, 0.0, 0.7, 2.5, 6.0, 15.0])
    d, g, v = one_sample(t, n)
    d_ref = t_to_d(t, n)
    g_ref, v_ref = d_to_g(d_ref, n, return_variance=True)
    np.testing.assert_allclose(d, d_ref, rtol=1e-12)
    np.testing.assert_allclose(g, g_ref, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(v, v_ref, rtol=1e-6)
    assert np.all(v > 0)
    # J by hand: n = 20 -> 1 - 3 / 75 = 0.96
    assert float(hedges_j(19)) == pytest.approx(0.96, abs=1e-15)


def test_two_sample_by_hand():
    # t = 3, n1 = 10, n2 = 15: d = 3 * sqrt(1/10 + 1/15) = 3 * sqrt(1/6); df = 23, J = 1 - 3/91
    d, g, v = two_sample(3.0, 10, 15)
    assert float(d) == pytest.approx(3.0 / math.sqrt(6.0), rel=1e-14)
    j = 1.0 - 3.0 / 91.0
    assert float(g) == pytest.approx(j * 3.0 / math.sqrt(6.0), rel=1e-14)
    assert float(v) == pytest.approx(j**2 * (25.0 / 150.0 + 1.5 / 50.0), rel=1e-14)


@pytest.mark.parametrize("df", [3.0, 9.0, 19.0, 120.0, 1e4])
def test_z_to_t_inverts_t_to_z(df):
    t = np.array([-60.0, -9.0, -2.0, -1e-6, 0.0, 0.5, 3.0, 25.0, 200.0])
    back = z_to_t(t_to_z(t, df), df)
    np.testing.assert_allclose(back, t, rtol=1e-9, atol=1e-12)
    assert np.isnan(z_to_t(np.array([np.nan]), df)).all()


def test_z_to_t_matches_nimare_where_it_is_exact():
    from nimare.transforms import z_to_t as nimare_z_to_t

    z = np.linspace(-8.0, 8.0, 33)
    for df in (4.0, 19.0, 200.0):
        np.testing.assert_allclose(z_to_t(z, df), nimare_z_to_t(z, df), rtol=1e-6, atol=1e-9)


def _zmap_job(tmp_path, record, t, conversion):
    from nvmeta.images.zmap import make_zmap

    mask_img = small_mask()
    d = tmp_path / "images" / str(record["id"])
    d.mkdir(parents=True, exist_ok=True)
    (d / "metadata.json").write_text(json.dumps(record))
    data = np.zeros(SHAPE, np.float32)
    data[np.asarray(mask_img.dataobj) > 0] = t
    nib.save(nib.Nifti1Image(data, AFFINE), d / "map.nii.gz")
    qc = make_zmap(
        d / "metadata.json", d / "map.nii.gz", mask_img, {**defaults("conversion"), **conversion}, d / "zmap.nii.gz", d / "qc.json", defaults("qc"),
        out_effects=(d / "g.nii.gz", d / "varg.nii.gz"),
    )  # fmt: skip
    m = np.asarray(mask_img.dataobj) > 0
    g = np.asarray(nib.load(d / "g.nii.gz").dataobj, np.float64)[m]
    v = np.asarray(nib.load(d / "varg.nii.gz").dataobj, np.float64)[m]
    return qc, g, v


def _record(image_id=5, n=20, map_type="T map", **kw):
    rec = {"id": image_id, "collection_id": 77, "map_type": map_type, "number_of_subjects": n,
           "statistic_parameters": None, "nvmeta": {"status": "ok"}}  # fmt: skip
    rec.update(kw)
    return rec


def test_zmap_job_writes_g_and_var_g(tmp_path):
    n_vox = int((np.asarray(small_mask().dataobj) > 0).sum())
    t = np.linspace(-6, 9, n_vox).astype(np.float32)
    t[t == 0] = 0.01
    # the record says n = 0 (NIDM), conversion.n_images gives 20: d = t / sqrt(20), df = 19
    qc, g, v = _zmap_job(tmp_path, _record(n=0), t, {"df": "n-1", "n_images": {"5": 20}})
    assert qc["status"] == "included" and qc["n"] == 20 and qc["df"] == 19.0
    assert qc["design"] == "one_sample" and qc["effect_size"] == "ok"
    _, g_ref, v_ref = one_sample(t.astype(np.float64), 20)
    np.testing.assert_allclose(g, g_ref, rtol=2e-6)  # t recovered from the float32 z-map
    np.testing.assert_allclose(v, v_ref, rtol=2e-6)
    # a z map: t recovered with the image's df (statistic_parameters = 30), n = 32
    z = t_to_z(t.astype(np.float64), 30.0).astype(np.float32)
    qc, g, _ = _zmap_job(tmp_path, _record(6, n=32, map_type="Z map", statistic_parameters=30), z, {})
    assert qc["effect_size"] == "ok"
    np.testing.assert_allclose(g, one_sample(z_to_t(z.astype(np.float64), 30.0), 32)[1], rtol=2e-6)
    np.testing.assert_allclose(g, one_sample(t.astype(np.float64), 32)[1], rtol=1e-5)
    # a declared two-sample design uses both group sizes
    conv = {"design_images": {"7": {"design": "two_sample", "n1": 12, "n2": 14}}}
    qc, g, v = _zmap_job(tmp_path, _record(7, n=26), t, conv)
    assert qc["design"] == "two_sample"
    np.testing.assert_allclose(g, two_sample(t.astype(np.float64), 12, 14)[1], rtol=2e-6)
    # no sample size at all: all-NaN effect maps and the reason in qc.json
    qc, g, v = _zmap_job(tmp_path, _record(8, n=None), t, {"df_images": {"8": 10}})
    assert qc["status"] == "included" and "no sample size" in qc["effect_size"]
    assert np.isnan(g).all() and np.isnan(v).all()


# ---------------------------------------------------------------------------------------
# pooling: references
# ---------------------------------------------------------------------------------------


def _textbook_dl(y: np.ndarray, v: np.ndarray):
    """DerSimonian & Laird (1986), one voxel at a time, plain Python floats."""
    est, tau2s, zs, qs, i2s = [], [], [], [], []
    for j in range(y.shape[1]):
        yy, vv = list(y[:, j]), list(v[:, j])
        w = [1.0 / x for x in vv]
        sw = sum(w)
        fe = sum(wi * yi for wi, yi in zip(w, yy, strict=True)) / sw
        q = sum(wi * (yi - fe) ** 2 for wi, yi in zip(w, yy, strict=True))
        c = sw - sum(wi * wi for wi in w) / sw
        tau2 = max(0.0, (q - (len(yy) - 1)) / c)
        ws = [1.0 / (x + tau2) for x in vv]
        mu = sum(wi * yi for wi, yi in zip(ws, yy, strict=True)) / sum(ws)
        est.append(mu)
        tau2s.append(tau2)
        zs.append(mu * math.sqrt(sum(ws)))
        qs.append(q)
        i2s.append(max(0.0, (q - (len(yy) - 1)) / q))
    return tuple(np.array(a) for a in (est, tau2s, zs, qs, i2s))


def test_dersimonian_laird_matches_textbook_and_pymare():
    from pymare.estimators import DerSimonianLaird, Hedges

    rng = np.random.default_rng(11)
    k, n = 9, 300
    v = rng.uniform(0.02, 0.2, size=(k, n))
    y = 0.4 + rng.normal(size=(k, n)) * np.sqrt(v + rng.uniform(0, 0.15, size=n))
    out = pool("dersimonian_laird", y, v)
    est, tau2, z, q, i2 = _textbook_dl(y, v)
    for got, ref in ((out["est"], est), (out["tau2"], tau2), (out["z"], z), (out["Q"], q), (out["I2"], i2)):
        np.testing.assert_allclose(got, ref, rtol=1e-10)
    assert (tau2 > 0).any() and (tau2 == 0).any()  # both branches of max(0, .) exercised
    # PyMARE, Wald inference (its default adds the Knapp-Hartung correction, not DL's textbook z)
    res = DerSimonianLaird(small_sample_correction="wald").fit(y=y, v=v, X=np.ones((k, 1))).summary()
    fe = res.get_fe_stats()
    np.testing.assert_allclose(out["est"], np.ravel(fe["est"]), rtol=1e-6)
    np.testing.assert_allclose(out["tau2"], np.ravel(res.tau2), rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(out["z"], np.ravel(fe["z"]), rtol=1e-6)
    # Hedges' tau2 estimator against PyMARE's Hedges
    out_h = pool("hedges", y, v)
    res_h = Hedges(small_sample_correction="wald").fit(y=y, v=v, X=np.ones((k, 1))).summary()
    np.testing.assert_allclose(out_h["tau2"], np.ravel(res_h.tau2), rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(out_h["est"], np.ravel(res_h.get_fe_stats()["est"]), rtol=1e-6)
    np.testing.assert_allclose(out_h["z"], np.ravel(res_h.get_fe_stats()["z"]), rtol=1e-6)


def test_q_and_i2_three_studies_by_hand():
    # y = 0.2, 0.5, 0.9; v = 0.04, 0.02, 0.05 -> w = 25, 50, 20, sum w = 95
    # est_FE = (5 + 25 + 18) / 95 = 48/95
    # Q = 25 (0.2 - 48/95)^2 + 50 (0.5 - 48/95)^2 + 20 (0.9 - 48/95)^2 = 10.35 - 48^2/95 = 10.35 - 24.2526... = 491/90.25...
    #   exactly: sum w y^2 = 1 + 12.5 + 16.2 = 29.7; Q = 29.7 - 48^2/95 = 29.7 - 2304/95 = 517.5/95 = 5.447368421
    # I2 = (Q - 2) / Q = 327.5/517.5 = 0.632850242; C = 95 - (625 + 2500 + 400)/95 = 5500/95
    # tau2_DL = (Q - 2) / C = (327.5/95) / (5500/95) = 327.5/5500 = 0.0595454545
    y = np.array([[0.2], [0.5], [0.9]])
    v = np.array([[0.04], [0.02], [0.05]])
    out = pool("dersimonian_laird", y, v)
    assert out["Q"][0] == pytest.approx(517.5 / 95, rel=1e-12)
    assert out["I2"][0] == pytest.approx(327.5 / 517.5, rel=1e-12)
    assert out["tau2"][0] == pytest.approx(327.5 / 5500, rel=1e-12)
    assert int(out["k"][0]) == 3
    fe = pool("fixed_effects_hedges", y, v)
    assert fe["est"][0] == pytest.approx(48 / 95, rel=1e-12)
    assert fe["se"][0] == pytest.approx(1 / math.sqrt(95), rel=1e-12)


def test_robust_estimators_match_numpy_and_scipy():
    """Estimates of numpy / scipy; the variance the larger of the spread's (scipy's MAD, scipy's
    Yuen test) and the sampling-variance floor (by hand), so never below fixed effects."""
    rng = np.random.default_rng(3)
    k, n = 11, 200
    y = rng.standard_t(3, size=(k, n)) * 0.3 + 0.5
    v = rng.uniform(0.002, 0.08, size=(k, n))
    y[:4, :50] = np.nan  # partial coverage: 7 maps in the first 50 voxels
    med = pool("median", y, v)
    tm = pool("trimmed_mean", y, v, trim=0.2)
    floors = 0
    for j in range(n):
        ok = np.isfinite(y[:, j])
        col, vj = y[ok, j], v[ok, j]
        kk = col.size
        assert int(med["k"][j]) == kk
        assert med["est"][j] == pytest.approx(np.median(col), rel=1e-12)
        spread = math.pi / (2 * kk) * stats.median_abs_deviation(col, scale="normal") ** 2
        floor = math.pi / (2 * kk) / np.mean(1 / np.sqrt(vj)) ** 2
        assert med["se"][j] ** 2 == pytest.approx(max(spread, floor), rel=1e-5)
        assert tm["est"][j] == pytest.approx(stats.trim_mean(col, 0.2), rel=1e-12)
        yuen = stats.ttest_ind(col, np.zeros(kk), trim=0.2, equal_var=False)
        spread = (tm["est"][j] / yuen.statistic) ** 2
        g, h = math.floor(0.2 * kk), kk - 2 * math.floor(0.2 * kk)
        q = stats.norm.isf(g / kk)
        cw = (1 - 2 * g / kk) - 2 * q * stats.norm.pdf(q) + 2 * (g / kk) * q * q
        floor = (kk - 1) / (h * (h - 1)) * cw * vj.mean()
        assert tm["se"][j] ** 2 == pytest.approx(max(spread, floor), rel=1e-9)
        floors += floor > spread
        for r in (med, tm):
            assert r["se"][j] >= 1 / math.sqrt(np.sum(1 / vj))
    assert 0 < floors < n  # both branches


def test_trimmed_mean_of_a_constant_winsorised_sample_has_the_floor_variance():
    """Five equal g and one outlier, γ = 0.2: the winsorised sample is constant, its variance
    exactly 0 (scipy's trimmed_stde gives rounding noise up to 2e-16, once z ~ 1e16); the
    variance is then the sampling-variance floor and the p normal (Satterthwaite df = inf)."""
    vals = [0.1, 0.3, 0.7, 1.1, 0.123456789]
    y = np.array([[a] * 5 + [3.0] for a in vals]).T
    out = pool("trimmed_mean", y, np.full_like(y, 0.05))
    ref = [float(stats.mstats.trimmed_stde(y[:, j], limits=(0.2, 0.2))) for j in range(len(vals))]
    np.testing.assert_allclose(ref, 0.0, atol=1e-15)
    q = stats.norm.isf(1 / 6)
    cw = (1 - 2 / 6) - 2 * q * stats.norm.pdf(q) + (2 / 6) * q * q
    np.testing.assert_allclose(out["se"], math.sqrt(5 / (4 * 3) * cw * 0.05), rtol=1e-12)
    assert np.isinf(out["df"]).all()
    np.testing.assert_allclose(out["z"], out["est"] / out["se"], rtol=1e-12)
    np.testing.assert_allclose(out["est"], [stats.trim_mean(y[:, j], 0.2) for j in range(len(vals))])


# ---------------------------------------------------------------------------------------
# whole method runs
# ---------------------------------------------------------------------------------------


def test_fixed_effects_hedges_matches_nimare(tmp_path):
    from nimare.dataset import Dataset
    from nimare.meta.ibma import FixedEffectsHedges

    st = EffectStudy(tmp_path)
    rng = np.random.default_rng(8)
    ns = [14, 20, 25, 33, 41, 18]
    tpaths = {}
    for i, n in enumerate(ns):
        t = rng.normal(size=st.n_vox) + 0.6 * math.sqrt(n) * (np.arange(st.n_vox) % 3 == 0)
        st.add_t(i + 1, t, n)
        vol = np.zeros(SHAPE, np.float32)
        vol[st.mask] = t
        tpaths[i + 1] = tmp_path / f"t{i + 1}.nii.gz"
        nib.save(nib.Nifti1Image(vol, AFFINE), tpaths[i + 1])
    summary, out = st.run("fixed_effects_hedges")
    source = {
        f"s{i}": {
            "contrasts": {"1": {"images": {"t": str(tpaths[i])}, "metadata": {"sample_sizes": [ns[i - 1]]}}}
        }
        for i in tpaths
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dset = Dataset(source, target=None, mask=st.mask_img)
        res = FixedEffectsHedges(small_sample_correction="wald").fit(dset)
    z_ref = np.asarray(res.get_map("z").dataobj, np.float64)[st.mask]
    est_ref = np.asarray(res.get_map("est").dataobj, np.float64)[st.mask]
    np.testing.assert_allclose(st.vec(out, "z"), z_ref, atol=1e-4)
    np.testing.assert_allclose(st.vec(out, "est"), est_ref, atol=1e-5)
    assert summary["k_maps"] == 6 and summary["n_voxels_reported"] == st.n_vox


def _planted(st: EffectStudy, rng, k: int, tau: float, delta: float = 0.5):
    """k one-sample studies: true standardised effect delta_i ~ N(delta, tau^2) in the signal voxels."""
    signal = np.arange(st.n_vox) % 2 == 0
    for i in range(k):
        n = int(rng.integers(20, 60))
        di = delta + tau * rng.normal()
        # one-sample t with noncentrality di * sqrt(n): (Z + di sqrt n) / sqrt(chi2_{n-1} / (n - 1))
        ncp = np.where(signal, di * math.sqrt(n), 0.0)
        t = (rng.normal(size=st.n_vox) + ncp) / np.sqrt(rng.chisquare(n - 1, size=st.n_vox) / (n - 1))
        st.add_t(i + 1, t, n)
    return signal


@pytest.mark.parametrize("tau", [0.0, 0.35])
def test_planted_truth_dl_recovers_d_and_heterogeneity(tmp_path, tau):
    st = EffectStudy(tmp_path)
    rng = np.random.default_rng(2026 + int(tau * 100))
    signal = _planted(st, rng, k=30, tau=tau)
    summary, out = st.run("dersimonian_laird")
    est, se = st.vec(out, "est"), st.vec(out, "se")
    tau2, i2 = st.vec(out, "tau2"), st.vec(out, "I2")
    covered = np.abs(est[signal] - 0.5) <= 1.96 * se[signal]
    assert covered.mean() >= 0.9, covered.mean()
    assert np.median(est[~signal]) == pytest.approx(0.0, abs=0.02)
    if tau == 0:
        assert np.median(tau2[signal]) < 0.005 and np.median(i2[signal]) < 0.2
    else:
        assert np.median(tau2[signal]) == pytest.approx(tau**2, rel=0.35)
        assert np.median(i2[signal]) > 0.6
        assert np.median(tau2[~signal]) < 0.005  # no heterogeneity where every study has 0
    assert summary["n_significant_fdr"] > 0.9 * signal.sum()


@pytest.mark.parametrize(
    ("method", "extra"),
    [("fixed_effects_hedges", 10.0), ("dersimonian_laird", 10.0), ("stouffer", 10.0), ("fisher", 10.0),
     ("median", 1.0), ("ttest", 1.0), ("permutation", 1.0)],
)  # fmt: skip
def test_jackknife_names_the_study_a_cluster_rests_on(tmp_path, method, extra):
    """Map 3 carries most of a blob (large ``extra``): it has the largest share; and each
    ``z_mean_without`` equals a direct refit without that map, for effect-size and z methods."""
    st = EffectStudy(tmp_path)
    rng = np.random.default_rng(4)
    blob = np.zeros(SHAPE, bool)
    blob[2:5, 2:5, 2:4] = True
    b = blob[st.mask]
    for i in range(6):
        t = rng.normal(size=st.n_vox) * 0.3 + np.where(b, 3.0 + (extra if i == 2 else 0.0), 0.0)
        st.add_t(i + 1, t, 25)
    summary, out = st.run(method, {"min_cluster_voxels": 5})
    jk = pd.read_csv(out / "jackknife.tsv", sep="\t", dtype={"image_ids": str})
    assert list(jk.columns) == ["cluster", "peak_x", "peak_y", "peak_z", "size_voxels", "unit", "image_ids",
                                "collection_id", "z_mean_without", "share"]  # fmt: skip
    c1 = jk[jk.cluster == 1]
    assert len(c1) == 6 and int(c1.size_voxels.iloc[0]) >= b.sum()
    if extra > 1:  # robust methods and the t-test are not driven by one map: no such claim there
        # the most influential map (|share| largest): positive for FE / Stouffer / Fisher; for DL
        # negative (the outlier inflates tau2, so leaving it out *raises* z)
        top = c1.loc[c1.share.abs().idxmax()]
        assert top["image_ids"] == "3"
        assert (top["share"] < 0) == (method == "dersimonian_laird")
    # z with image 3 left out, against a direct refit without it
    rows = [r for r in st.rows if r["image_id"] != 3]
    _, out3 = st.run(method, {"min_cluster_voxels": 5}, outname="without3", rows=rows)
    z_wo = st.vec(out3, "z")
    labels = np.asarray(nib.load(out / "z_fdr.nii.gz").dataobj)[st.mask] != 0
    from nvmeta.meta.outputs import cluster_labels

    lab, _ = cluster_labels(st.vec(out, "z_fdr"), st.mask, AFFINE, 5)
    assert labels[lab == 1].all()
    ref = float(np.mean(z_wo[lab == 1]))
    got = float(c1[c1.image_ids == "3"].z_mean_without.iloc[0])
    assert got == pytest.approx(ref, rel=1e-6)


def test_combine_within_collection_averages_g(tmp_path, caplog):
    import logging

    st = EffectStudy(tmp_path)
    rng = np.random.default_rng(9)
    ts = [rng.normal(size=st.n_vox) + 2.0 for _ in range(4)]
    for i, t in enumerate(ts):
        st.add_t(i + 1, t, 20, collection_id=100 if i < 2 else 200 + i)
    with caplog.at_level(logging.INFO, logger="nvmeta.meta"):
        summary, out = st.run("fixed_effects_hedges", {"combine_within": "collection"})
    assert "averaged (mean g)" in caplog.text and summary["k_units"] == 3

    def load(i, name):
        return np.asarray(nib.load(st.path(i).with_name(name)).dataobj, np.float64)[st.mask]

    g = [load(i, "g.nii.gz") for i in range(1, 5)]
    v = [load(i, "varg.nii.gz") for i in range(1, 5)]
    # the collection's unit: mean g, mean var g (conservative: the maps share their subjects)
    ref = pool("fixed_effects_hedges", np.stack([(g[0] + g[1]) / 2, g[2], g[3]]),
               np.stack([(v[0] + v[1]) / 2, v[2], v[3]]))  # fmt: skip
    np.testing.assert_allclose(st.vec(out, "est"), ref["est"], rtol=1e-5)
    # off (the default): the collection's two maps count twice, and the summary says so
    summary, _ = st.run("fixed_effects_hedges", outname="none")
    assert any("collection 100 contributes 2 maps" in w for w in summary["warnings"])


def test_robust_methods_need_five_maps_at_a_voxel(tmp_path):
    """Below 5 values a 20 % trimmed mean trims nothing and a median rests on 2 or 3 values: not
    reported (two near-equal g gave MAD ~ 0 and z in the thousands there before the variance
    floor)."""
    st = EffectStudy(tmp_path)
    rng = np.random.default_rng(12)
    edge = np.arange(st.n_vox) < 40  # only 2 of the 6 maps cover these voxels
    for i in range(6):
        t = rng.normal(size=st.n_vox) + 3.0
        if i >= 2:
            t[edge] = np.nan
        else:
            t[edge] = 3.0 + 1e-4 * i  # near-identical values where only two maps have data
        st.add_t(i + 1, t, 30)
    for method in ("median", "trimmed_mean"):
        summary, out = st.run(method)
        z, k = st.vec(out, "z"), st.vec(out, "k")
        assert np.isnan(z[edge]).all() and (k[edge] == 2).all()
        assert np.isfinite(z[~edge]).all() and np.nanmax(np.abs(z)) < 100
        assert summary["min_maps_effective"] == 5


def test_near_identical_maps_give_no_absurd_robust_z(tmp_path):
    """Five of six maps agree to 1e-3 in a block of voxels (realistic n, var(g) ~ 0.04): the
    spread-only variance collapsed there (z in the hundreds, as the demo's z = 379 and 480 from 5
    maps); now z is at most the fixed-effects z of the same maps, and the run's check passes."""
    st = EffectStudy(tmp_path)
    rng = np.random.default_rng(41)
    block = np.arange(st.n_vox) < 60
    for i, n in enumerate([22, 25, 31, 28, 40, 19]):
        t = rng.normal(size=st.n_vox) + 2.5
        if i < 5:
            t[block] = 0.9 * math.sqrt(n) * (1 + 1e-3 * rng.normal(size=int(block.sum())))
        st.add_t(i + 1, t, n)
    _, out_fe = st.run("fixed_effects_hedges")
    z_fe = st.vec(out_fe, "z")
    for method in ("median", "trimmed_mean"):
        summary, out = st.run(method)
        z = st.vec(out, "z")
        assert np.abs(z[block]).max() <= 1.01 * np.abs(z_fe[block]).max(), method
        assert summary["z_max"] < 1.2 * np.nanmax(z_fe), method
        assert summary["plausibility"]["ok"] is True and summary["plausibility"]["peak_ok"] is True
        se_fe = st.vec(out_fe, "se")
        assert (st.vec(out, "se") >= se_fe * (1 - 1e-5)).all()  # float32 maps


def test_a_map_whose_g_was_not_computed_is_not_counted(tmp_path):
    """An included map with n = 3 has a z-map but no g (one-sample g needs n >= 4): the effect
    methods leave it out by name and reason, with the map that has no sample size; k_maps,
    k_units and the result count only the maps that were pooled."""
    st = EffectStudy(tmp_path)
    rng = np.random.default_rng(43)
    for image_id, n in ((1, 20), (2, 30), (3, 3), (4, 25)):
        st.add_t(image_id, rng.normal(size=st.n_vox) + 2.0, n)
    qc4 = st.path(4).with_name("qc.json")
    qc4.write_text(json.dumps({**json.loads(qc4.read_text()), "n": None}))  # no sample size
    assert "n >= 4" in json.loads(st.path(3).with_name("qc.json").read_text())["effect_size"]
    summary, out = st.run("fixed_effects_hedges", {"min_maps": 1})
    assert summary["k_maps"] == 2 and summary["k_units"] == 2
    warned = " | ".join(summary["warnings"])
    assert "1 map(s) without a sample size left out: [4]" in warned
    assert (
        "1 map(s) without effect sizes left out: 3 (not computed: one-sample effect sizes need n >= 4"
        in warned
    )
    y, v = _effect_maps(st, [1, 2])
    np.testing.assert_allclose(st.vec(out, "est"), pool("fixed_effects_hedges", y, v)["est"], rtol=1e-5)
    assert (st.vec(out, "k") == 2).all()
    # the z methods read map 3 (its z exists)
    summary_z, _ = st.run("stouffer", {"min_maps": 1})
    assert summary_z["k_maps"] == 4


# ---------------------------------------------------------------------------------------
# the g / var(g) stack of pass 2 (effect methods at 20,000 maps)
# ---------------------------------------------------------------------------------------


def test_stack_reads_a_voxel_chunk_in_one_read_per_block(monkeypatch, tmp_path):
    """Laid out by voxel chunk, a chunk costs one read per block of buffered maps (the map-by-map
    layout cost one read per map and field: 40,000 reads of 1 KB per chunk at 20,000 maps), and
    every selection reads back exactly what was written."""
    import os

    from nvmeta.meta import effects

    k, n_vox, chunk = 23, 1000, 96
    monkeypatch.setattr(effects, "STACK_BUFFER_BYTES", 5 * 2 * 4 * n_vox)  # blocks of 5 maps
    rng = np.random.default_rng(21)
    g = rng.normal(size=(k, n_vox)).astype(np.float32)
    v = rng.uniform(0.01, 1.0, size=(k, n_vox)).astype(np.float32)
    g[3, 100:300] = np.nan
    reads = []
    real_pread = os.pread
    monkeypatch.setattr(os, "pread", lambda fd, n, off: reads.append(n) or real_pread(fd, n, off))
    for fields in (2, 1):
        stack = effects._Stack(tmp_path, k, n_vox, fields, chunk)
        assert stack.block == (5 if fields == 2 else 10)
        n_blocks = math.ceil(k / stack.block)
        for i in range(k):
            stack.append(g[i], v[i] if fields == 2 else None)
        selections = [slice(0, 96), slice(960, 1000), slice(96, 192),  # whole chunks, the short last one
                      slice(50, 400), np.array([0, 5, 95, 96, 97, 500, 998, 999]),  # spanning chunks
                      np.arange(120, 130)]  # fmt: skip
        for sel in selections:
            reads.clear()
            y, vv = stack.take(sel)
            np.testing.assert_array_equal(y, g[:, sel].astype(np.float64))
            if fields == 2:
                np.testing.assert_array_equal(vv, v[:, sel].astype(np.float64))
            else:
                assert vv is None
            cols = np.arange(n_vox)[sel]
            assert len(reads) == n_blocks * np.unique(cols // chunk).size
        for bad in (np.array([5, 3]), np.array([7, 7]), np.array([n_vox])):
            with pytest.raises(ValueError, match="strictly increasing"):
                stack.take(bad)
        stack.close()
        assert not stack.path.exists()
    assert sum(1 for _ in tmp_path.iterdir()) == 0


def _effect_maps(st: EffectStudy, ids) -> tuple[np.ndarray, np.ndarray]:
    def load(i, name):
        return np.asarray(nib.load(st.path(i).with_name(name)).dataobj, np.float64)[st.mask]

    return np.stack([load(i, "g.nii.gz") for i in ids]), np.stack([load(i, "varg.nii.gz") for i in ids])


@pytest.mark.parametrize("jackknife", [True, False])
def test_effect_methods_keep_only_the_stack_pass_2_reads(monkeypatch, tmp_path, jackknife):
    """fixed_effects_hedges keeps no stack unless the jackknife runs (it was written whatever the
    fit read: 37.7 GB at 20,000 maps); the robust methods keep g only (their variance floor needs
    only sums of var(g), taken while the maps are read); and every method's maps, read in several
    chunks and blocks, equal one in-memory pool() over all maps."""
    from nvmeta.meta import effects, run

    st = EffectStudy(tmp_path)
    rng = np.random.default_rng(31)
    for i in range(9):
        t = rng.normal(size=st.n_vox) + 2.0
        t[rng.random(st.n_vox) < 0.1] = np.nan  # partial coverage
        if i >= 4:
            t[:20] = np.nan  # 4 maps: not reported by the robust methods
        st.add_t(i + 1, t, int(rng.integers(15, 60)))
    monkeypatch.setattr(effects, "_chunk_size", lambda k: 37)  # 256 mask voxels: 7 chunks
    monkeypatch.setattr(effects, "STACK_BUFFER_BYTES", 4 * 2 * 4 * st.n_vox)  # blocks of 4 (or 8) maps
    if not jackknife:  # 9 units above the limit: the jackknife is skipped (as above 300 units)
        monkeypatch.setattr(effects, "JACKKNIFE_MAX_UNITS", 8)
        monkeypatch.setattr(run, "JACKKNIFE_MAX_UNITS", 8)
    made = []

    class Spy(effects._Stack):
        def __init__(self, *args):
            super().__init__(*args)
            made.append(self.fields)

    monkeypatch.setattr(effects, "_Stack", Spy)
    y, v = _effect_maps(st, range(1, 10))
    expected = {"fixed_effects_hedges": [2] if jackknife else [],
                "dersimonian_laird": [2], "hedges": [2],
                "median": [2] if jackknife else [1], "trimmed_mean": [2] if jackknife else [1]}  # fmt: skip
    for method, fields in expected.items():
        made.clear()
        summary, out = st.run(method, {"min_cluster_voxels": 5})
        assert made == fields, method
        assert ("jackknife skipped (9 units > 8)" in summary["jackknife"]) == (not jackknife)
        ref = pool(method, y, v)
        rep = ref["k"] >= summary["min_maps_effective"]  # the maps are NaN where not reported
        assert rep.sum() > 200 and np.isnan(st.vec(out, "z")[~rep]).all()
        for name in ("est", "se", "z", "tau2", "Q", "I2"):
            np.testing.assert_allclose(st.vec(out, name)[rep], ref[name][rep], rtol=1e-5, atol=1e-6,
                                       err_msg=f"{method} {name}")  # fmt: skip
        assert not list(out.glob("*.part.stack"))
        if jackknife:  # the leave-one-out z, read from the stack in 7 chunks x 3 blocks
            from nvmeta.meta.outputs import cluster_labels

            lab, _ = cluster_labels(st.vec(out, "z_fdr"), st.mask, AFFINE, 5)
            jk = pd.read_csv(out / "jackknife.tsv", sep="\t", dtype={"image_ids": str})
            c1 = jk[jk.cluster == 1].set_index("image_ids")
            # (the median, on 9 maps with df 2.9, finds the smallest cluster: 144 of 256 voxels)
            assert (lab == 1).sum() > 100 and len(c1) == 9
            for i in range(9):
                keep = np.arange(9) != i
                zw = pool(method, y[keep], v[keep])["z"][lab == 1]
                ref_mean = float(np.mean(zw[np.isfinite(zw)]))
                assert c1.loc[str(i + 1), "z_mean_without"] == pytest.approx(ref_mean, rel=1e-6), method
