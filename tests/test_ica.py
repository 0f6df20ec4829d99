"""Cross-study spatial ICA (nvmeta.ica) on planted sources.

Synthetic maps on a 24^3 box mix four known sparse spatial patterns (Gaussian blobs; one bipolar) with
random weights plus Gaussian noise; each map is dominated by one pattern and its metadata text names it.
References are independent: the planted patterns and weights, a direct scikit-learn FastICA on the same
matrix, nilearn's own masking of the maps (the example's pipeline), and numpy's exact SVD.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from nvmeta import ica
from nvmeta.figures.ica_maps import component_figure
from nvmeta.ica.fastica import spatial_fastica
from nvmeta.workflow.config import defaults

SHAPE = (24, 24, 24)
AFFINE = np.diag([4.0, 4.0, 4.0, 1.0])
AFFINE[:3, 3] = [-46.0, -46.0, -46.0]
WORDS = ["motor", "auditory", "visual", "language"]
NS_WORDS = ["finger tapping", "tones", "checkerboard", "sentences"]
N_MAPS = 160
N_COMP = 4


def planted_patterns() -> np.ndarray:
    """4 x n_voxels sparse patterns: Gaussian blobs, the last one bipolar (positive tail larger)."""
    g = np.indices(SHAPE).reshape(3, -1).T.astype(float)

    def blob(c, s=2.5):
        return np.exp(-((g - np.asarray(c)) ** 2).sum(1) / (2 * s**2))

    return np.stack(
        [
            blob((6, 6, 6)),
            blob((17, 6, 12)),
            blob((6, 17, 17)),
            blob((17, 17, 6)) - 0.5 * blob((12, 12, 19), 2.0),
        ]
    )


def make_dataset(root: Path, n_maps: int = N_MAPS, seed: int = 0) -> dict:
    """Write zmaps, metadata.json, qc.tsv, mask for ``n_maps`` planted maps under ``root``."""
    rng = np.random.default_rng(seed)
    patterns = planted_patterns()
    weights = rng.normal(0, 0.4, (n_maps, N_COMP))
    dominant = np.arange(n_maps) % N_COMP
    weights[np.arange(n_maps), dominant] += 2.0 + np.abs(rng.normal(size=n_maps))
    data = (weights @ patterns + rng.normal(0, 0.15, (n_maps, patterns.shape[1]))).astype(np.float32)
    vol = data.reshape((n_maps,) + SHAPE)
    # no-data: a slab missing in the first 30 maps (kept: data in > 50 % of maps), a corner missing in
    # 70 % of the maps (dropped with min_fraction 0.5), an inf somewhere
    vol[:30, :, :, 21:] = np.nan
    vol[: int(0.7 * n_maps), :3, :3, :3] = np.nan
    vol[5, 10, 10, 10] = np.inf
    ids = list(range(5001, 5001 + n_maps))
    for i, iid in enumerate(ids):
        d = root / "images" / str(iid)
        d.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(vol[i], AFFINE), d / "zmap.nii.gz")
        w = WORDS[dominant[i]]
        record = {
            "id": iid,
            "name": f"{w} localizer tstat",
            "contrast_definition": f"{w} stimulation vs rest",
            "cognitive_paradigm_cogatlas": None,
            "description": "group level statistic map",
            "nvmeta": {
                "status": "ok",
                "collection": {"name": f"Study {i // 16}", "description": "An fMRI study"},
            },
        }
        (d / "metadata.json").write_text(json.dumps(record))
    qc = pd.DataFrame({"image_id": ids, "status": "included", "reason": ""})
    # an excluded row in the middle: must be ignored
    qc = pd.concat(
        [
            qc.iloc[:10],
            pd.DataFrame({"image_id": [999], "status": ["excluded"], "reason": ["x"]}),
            qc.iloc[10:],
        ]
    )
    qc.to_csv(root / "qc.tsv", sep="\t", index=False)
    mask = np.ones(SHAPE, dtype=np.uint8)
    nib.save(nib.Nifti1Image(mask, AFFINE), root / "mask.nii.gz")
    return {
        "root": root,
        "ids": ids,
        "patterns": patterns,
        "weights": weights,
        "dominant": dominant,
        "volumes": vol,
    }


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("planted"))


def draw_figures(outdir: Path, n_components: int) -> None:
    """What the workflow's ica_component jobs do after the ICA job: one figure per component."""
    for k in range(n_components):
        component_figure(
            outdir / "components.nii.gz", outdir / "summary.json", k, outdir / f"component_{k}.png"
        )


def run(ds: dict, outdir: Path, log=None, **cfg):
    root = ds["root"]
    base = {**defaults("ica"), "n_components": N_COMP}
    base.update(cfg)
    plots = base.pop("plots", False)
    client_factory = base.pop("client_factory", None)
    summary = ica.run_ica(
        root / "qc.tsv",
        lambda i: root / "images" / str(i) / "zmap.nii.gz",
        lambda i: root / "images" / str(i) / "metadata.json",
        nib.load(root / "mask.nii.gz"),
        base,
        outdir,
        logger=log,
        client_factory=client_factory,
    )
    if plots:
        draw_figures(outdir, summary["n_components"])
    return summary


def read_components(outdir: Path) -> np.ndarray:
    img = nib.load(outdir / "components.nii.gz")
    assert img.get_data_dtype() == np.float32
    data = np.asarray(img.dataobj)
    return data.reshape(-1, data.shape[-1]).T  # components x voxels (box mask = all voxels)


def corr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson correlation of rows of a with rows of b over voxels finite in both."""
    ok = np.all(np.isfinite(a), axis=0) & np.all(np.isfinite(b), axis=0)
    return np.corrcoef(a[:, ok], b[:, ok])[: len(a), len(a) :]


def match(components: np.ndarray, patterns: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each pattern: the matched component (Hungarian on |r|) and the signed r."""
    from scipy.optimize import linear_sum_assignment

    r = corr(patterns, components)
    rows, cols = linear_sum_assignment(-np.abs(r))
    return cols[np.argsort(rows)], r[rows, cols][np.argsort(rows)]


@pytest.fixture(scope="module")
def default_run(planted, tmp_path_factory):
    out = tmp_path_factory.mktemp("ica_default")
    summary = run(planted, out, plots=True, n_runs=3)
    return out, summary


# --------------------------------------------------------------------------------------------------
# planted sources, default config
# --------------------------------------------------------------------------------------------------
def test_planted_sources_recovered(planted, default_run):
    out, summary = default_run
    comps = read_components(out)
    assert comps.shape == (N_COMP, np.prod(SHAPE))
    idx, r = match(comps, planted["patterns"])
    # signed: the larger tail is positive, as the planted patterns
    assert np.all(r >= 0.9), r
    # the mixing matrix recovers each map's planted weight
    mixing = pd.read_csv(out / "mixing.tsv", sep="\t")
    assert list(mixing.columns) == ["image_id"] + [f"IC{k}" for k in range(N_COMP)]
    assert mixing["image_id"].tolist() == planted["ids"]  # included rows, file order (excluded 999 left out)
    for j in range(N_COMP):
        rw = np.corrcoef(mixing[f"IC{idx[j]}"], planted["weights"][:, j])[0, 1]
        assert rw >= 0.9, (j, rw)
    assert summary["n_maps"] == N_MAPS and summary["reduced"] is False


def test_sign_flip_rule(default_run):
    comps = read_components(default_run[0])
    finite = np.where(np.isfinite(comps), comps, 0)
    assert np.all(finite.max(axis=1) >= -finite.min(axis=1))


def test_nodata_voxels(planted, default_run):
    out, summary = default_run
    vol = np.asarray(nib.load(out / "components.nii.gz").dataobj)
    assert vol.shape == SHAPE + (N_COMP,)
    # the corner (data in 30 % of maps) is dropped with min_fraction 0.5: NaN, never 0
    assert np.isnan(vol[:3, :3, :3]).all()
    # the slab (data in 130 / 160 maps) is kept
    assert np.isfinite(vol[:, :, 21:]).all()
    assert summary["n_voxels_used"] == np.prod(SHAPE) - 27
    assert summary["n_mask_voxels"] == np.prod(SHAPE)


def test_metadata_terms_name_the_pattern(planted, default_run):
    out, summary = default_run
    comps = read_components(out)
    idx, _ = match(comps, planted["patterns"])
    terms = pd.read_csv(out / "terms.tsv", sep="\t")
    assert list(terms.columns) == ["component", "rank", "term", "weight"]
    assert terms.groupby("component")["rank"].apply(list).tolist() == [[1, 2, 3]] * N_COMP
    for j, word in enumerate(WORDS):
        top = terms[(terms.component == idx[j]) & (terms["rank"] == 1)]["term"].item()
        assert top == word
    # boilerplate never shows up; bigrams are within-field ("motor stimulation", not "motor rest")
    assert not set(terms.term) & {"tstat", "map", "group", "fmri", "level", "study", "statistic"}
    assert "motor rest" not in set(terms.term)
    assert summary["term_source"] == "metadata" and summary["term_fallback"] is None
    assert summary["titles"][idx[0]].startswith(f"IC{idx[0]}: motor, ")


def test_pngs_written(default_run):
    out, summary = default_run
    for k in range(N_COMP):
        png = out / f"component_{k}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert png.stat().st_size > 5000
    assert not list(out.glob(".ica_tmp_*")) and not list(out.glob("*.part*"))  # memmap dir removed


def test_component_figure_is_drawn_from_the_recorded_title_and_threshold(default_run, tmp_path, monkeypatch):
    """A figure job reads only components.nii.gz and summary.json: component k's volume, its title and
    the 90th percentile of its |values| over the voxels used (computed here independently)."""
    from nvmeta.figures import ica_maps

    out, summary = default_run
    drawn = {}
    monkeypatch.setattr(ica_maps, "plot_component", lambda *args: drawn.update(args=args))
    volume = np.asarray(nib.load(out / "components.nii.gz").dataobj)
    for k in range(N_COMP):
        component_figure(out / "components.nii.gz", out / "summary.json", k, tmp_path / "c.png")
        vol, affine, threshold, text, dest = drawn["args"]
        np.testing.assert_array_equal(vol, volume[..., k])
        np.testing.assert_allclose(affine, AFFINE)
        values = volume[..., k][np.isfinite(volume[..., k])]
        assert values.size == summary["n_voxels_used"]
        assert threshold == pytest.approx(np.percentile(np.abs(values.astype(np.float64)), 90), rel=1e-6)
        assert text.startswith(summary["titles"][k] + "  |  ") and f"|value| > {threshold:.2f}" in text
        assert "(top 10 % of voxels)" in text and "NOT CONVERGED" not in text
    with pytest.raises(ValueError, match="has 4 components .*no component 4"):
        component_figure(out / "components.nii.gz", out / "summary.json", N_COMP, tmp_path / "c.png")


@pytest.mark.e2e
def test_one_ica_rule_over_the_analyses(tmp_path):
    """Rule ica and rule ica_component serve every analysis with an ica block (no rule per analysis)."""
    from helpers import make_workdir, run_snakemake

    cfg = {
        "analyses": {
            "a": {"image_ids": [1, 2], "ica": {"n_components": 2}},
            "b": {"image_ids": [3, 4], "ica": {}},
        }
    }
    wf = make_workdir(tmp_path, cfg)
    rules = run_snakemake(wf, "--list-rules").stdout.split()
    assert "ica" in rules and "ica_component" in rules
    assert not [r for r in rules if r.startswith("ica_") and r != "ica_component"], rules


def test_stability(default_run):
    out, summary = default_run
    stab = pd.read_csv(out / "stability.tsv", sep="\t")
    assert list(stab.columns) == ["component", "mean_abs_corr", "min_abs_corr", "n_runs"]
    assert stab["component"].tolist() == list(range(N_COMP))
    assert stab["mean_abs_corr"].between(0, 1).all() and stab["min_abs_corr"].between(0, 1).all()
    assert (stab["min_abs_corr"] <= stab["mean_abs_corr"] + 1e-12).all()
    assert (stab["n_runs"] == 3).all()
    # planted, well separated sources: every seed finds them
    assert (stab["mean_abs_corr"] > 0.95).all()
    summary_json = json.loads((out / "summary.json").read_text())
    assert len(summary_json["n_iter"]) == 3 and summary_json["converged"] == [True] * 3
    assert summary_json["n_voxels_used"] == summary["n_voxels_used"]


def test_one_run_writes_a_stability_table_that_says_so(planted, tmp_path):
    """The ICA job's outputs do not depend on the config: with one run stability.tsv has its rows with
    n_runs 1 and no correlation (there is no other run), and summary.json no stability."""
    summary = run(planted, tmp_path, n_runs=1)
    assert {p.name for p in tmp_path.iterdir()} == {
        "components.nii.gz",
        "mixing.tsv",
        "terms.tsv",
        "summary.json",
        "stability.tsv",
    }
    stab = pd.read_csv(tmp_path / "stability.tsv", sep="\t")
    assert list(stab.columns) == ["component", "mean_abs_corr", "min_abs_corr", "n_runs"]
    assert stab["component"].tolist() == list(range(N_COMP)) and (stab["n_runs"] == 1).all()
    assert stab["mean_abs_corr"].isna().all() and stab["min_abs_corr"].isna().all()
    assert "stability_mean_abs_corr" not in summary and summary["n_runs"] == 1


# --------------------------------------------------------------------------------------------------
# equivalence with the example / direct scikit-learn
# --------------------------------------------------------------------------------------------------
def test_same_solution_as_direct_sklearn_and_nilearn_masking(planted, tmp_path):
    """On data where scikit-learn's FastICA converges, the stabilised iteration finds the same fixed point:
    the same components (order aside) and mixing, as nilearn's example computes them with FastICA."""
    from nilearn.image import smooth_img
    from nilearn.maskers import NiftiMasker
    from sklearn.decomposition import FastICA

    summary = run(planted, tmp_path, standardize=False, nodata="zero", min_fraction=0.0, reduce_above=10_000)
    assert summary["converged"] == [True]
    ours = read_components(tmp_path)
    mixing = pd.read_csv(tmp_path / "mixing.tsv", sep="\t").iloc[:, 1:].to_numpy()
    paths = [planted["root"] / "images" / str(i) / "zmap.nii.gz" for i in planted["ids"]]

    # the same X built independently: non-finite -> 0, mask voxels, vstack of a list (as the example)
    x = np.vstack(
        [
            np.nan_to_num(nib.load(p).get_fdata(dtype=np.float32).ravel(), nan=0, posinf=0, neginf=0)
            for p in paths
        ]
    )
    direct = FastICA(n_components=N_COMP, random_state=0, tol=1e-10, max_iter=10_000)
    sources = direct.fit_transform(x.astype(np.float64).T).T
    assert direct.n_iter_ < 10_000
    index, r = ica.match_components(ours, sources)
    assert np.all(r > 0.99999), r
    signs = np.sign(np.sum(ours * sources[index], axis=1))
    np.testing.assert_allclose(ours, sources[index] * signs[:, None], atol=1e-4)
    np.testing.assert_allclose(mixing, direct.mixing_[:, index] * signs[None, :], rtol=1e-4, atol=1e-5)

    # the example's own masking (smooth_img(fwhm=None) cleaning + NiftiMasker) builds the same X (checked on
    # the first 24 maps, which hold the NaN slab, the NaN corner and the inf; nilearn masks slowly)
    masker = NiftiMasker(mask_img=planted["root"] / "mask.nii.gz").fit()
    x_nl = np.vstack([masker.transform(smooth_img(str(p), fwhm=None)) for p in paths[:24]])
    assert x_nl.dtype == x.dtype
    np.testing.assert_array_equal(x_nl, x[:24])


RUN_IN_SUBPROCESS = """
import json, sys
from pathlib import Path
from nvmeta.ica import run_ica
from nvmeta.workflow.config import defaults
root, out, cfg = Path(sys.argv[1]), Path(sys.argv[2]), {**defaults("ica"), **json.loads(sys.argv[3])}
run_ica(root / "qc.tsv", lambda i: root / "images" / str(i) / "zmap.nii.gz",
        lambda i: root / "images" / str(i) / "metadata.json", root / "mask.nii.gz", cfg, out)
"""


def test_byte_identical_reruns(planted, tmp_path):
    """Same config -> same bytes: a fresh process (first FastICA call there) and a run in this process."""
    import subprocess
    import sys

    for reduce_above in (10_000, 50):
        cfg = {"n_components": N_COMP, "reduce_above": reduce_above, "n_runs": 2}
        outs = [tmp_path / f"r{reduce_above}_{i}" for i in range(2)]
        subprocess.run(
            [sys.executable, "-c", RUN_IN_SUBPROCESS, str(planted["root"]), str(outs[0]), json.dumps(cfg)],
            check=True,
        )
        run(planted, outs[1], **cfg)
        for name in ("components.nii.gz", "mixing.tsv", "terms.tsv", "stability.tsv", "summary.json"):
            assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes(), (reduce_above, name)


def test_other_seed_gives_other_bytes_same_patterns(planted, tmp_path):
    run(planted, tmp_path / "a", random_state=0)
    run(planted, tmp_path / "b", random_state=7)
    a, b = read_components(tmp_path / "a"), read_components(tmp_path / "b")
    assert not np.array_equal(a, b)
    idx, r = match(b, planted["patterns"])
    assert np.all(r >= 0.9)


# --------------------------------------------------------------------------------------------------
# reduction path
# --------------------------------------------------------------------------------------------------
def test_reduction_path_recovers_patterns(planted, tmp_path, caplog):
    log = logging.getLogger("test.ica.reduce")
    with caplog.at_level(logging.INFO, logger="test.ica.reduce"):
        summary = run(planted, tmp_path, log=log, reduce_above=50, reduce_factor=3)
    assert summary["reduced"] is True
    assert summary["pca"]["n_dims"] == 3 * N_COMP
    assert 0 < summary["pca"]["explained_variance_ratio"] <= 1
    assert "randomised PCA" in caplog.text
    comps = read_components(tmp_path)
    idx, r = match(comps, planted["patterns"])
    assert np.all(r >= 0.9), r
    mixing = pd.read_csv(tmp_path / "mixing.tsv", sep="\t")
    for j in range(N_COMP):
        assert np.corrcoef(mixing[f"IC{idx[j]}"], planted["weights"][:, j])[0, 1] >= 0.9
    terms = pd.read_csv(tmp_path / "terms.tsv", sep="\t")
    for j, word in enumerate(WORDS):
        assert terms[(terms.component == idx[j]) & (terms["rank"] == 1)]["term"].item() == word


def test_reduced_equals_unreduced_when_pca_keeps_everything(planted, tmp_path):
    """With n_dims >= n_maps - 1 the PCA step is a rotation: same ICA subspace, same components."""
    sub = make_dataset(tmp_path / "small", n_maps=12, seed=3)
    run(sub, tmp_path / "full", reduce_above=1000)
    run(sub, tmp_path / "red", reduce_above=5, reduce_factor=3)
    a, b = read_components(tmp_path / "full"), read_components(tmp_path / "red")
    from nvmeta.ica import match_components

    _, r = match_components(a[:, np.isfinite(a).all(0)], b[:, np.isfinite(b).all(0)])
    assert np.all(r > 0.999), r


def test_randomized_pca_matches_exact_svd(tmp_path):
    rng = np.random.default_rng(1)
    n_maps, n_vox, rank = 60, 3000, 5
    low = rng.normal(size=(n_maps, rank)) @ (
        rng.normal(size=(rank, n_vox)) * np.linspace(5, 1, rank)[:, None]
    )
    x = (low + 0.05 * rng.normal(size=(n_maps, n_vox))).astype(np.float32)
    cols = np.ones(n_vox, bool)
    cols[:100] = False
    m = ica.build_matrix(iter(x), n_maps, n_vox, tmp_path / "m.f32", standardize=False, block_rows=7)
    scores, loadings, info = ica.randomized_pca(m, cols, rank, random_state=0, block_rows=7)
    xc = x[:, cols].astype(np.float64)
    xc -= xc.mean(axis=1, keepdims=True)
    u, s, vt = np.linalg.svd(xc, full_matrices=False)
    # same subspace (cosines of principal angles ~ 1) and same singular values
    cos = np.linalg.svd(loadings.T @ u[:, :rank], compute_uv=False)
    assert np.all(cos > 0.9999)
    np.testing.assert_allclose(np.linalg.norm(scores, axis=0), s[:rank], rtol=1e-4)
    np.testing.assert_allclose(scores, xc.T @ loadings, rtol=1e-3, atol=1e-3 * s[0])
    np.testing.assert_allclose(
        info["explained_variance_ratio"], (s[:rank] ** 2).sum() / (s**2).sum(), rtol=1e-4
    )
    assert info["n_passes"] == 10


# --------------------------------------------------------------------------------------------------
# data matrix
# --------------------------------------------------------------------------------------------------
def test_build_matrix_standardises_over_finite_voxels(tmp_path):
    rng = np.random.default_rng(2)
    maps = rng.normal(3, 2, (9, 500)).astype(np.float32)
    maps[0, :50] = np.nan
    maps[1, 7] = -np.inf
    maps[2] = 1.5  # constant
    maps[3] = np.nan  # no data
    m = ica.build_matrix(
        (row for row in maps),
        9,
        500,
        tmp_path / "m.f32",
        standardize=True,
        block_rows=2,
        labels=list("abcdefghi"),
    )
    got = np.fromfile(tmp_path / "m.f32", dtype=np.float32).reshape(9, 500)
    for i in (0, 1, 4, 8):
        ok = np.isfinite(maps[i])
        ref = np.zeros(500)
        ref[ok] = (maps[i][ok] - maps[i][ok].astype(np.float64).mean()) / maps[i][ok].astype(np.float64).std()
        np.testing.assert_allclose(got[i], ref, rtol=1e-5, atol=1e-6)
    assert not got[2].any() and not got[3].any()
    assert m.problems == ["map c: constant map (row set to 0)", "map d: no finite data (row set to 0)"]
    np.testing.assert_array_equal(m.count, np.isfinite(maps).sum(axis=0))
    np.testing.assert_array_equal(m.n_finite, np.isfinite(maps).sum(axis=1))
    np.testing.assert_array_equal(m.load(), got)
    np.testing.assert_array_equal(m.read_rows(3, 7, np.arange(500) % 2 == 0), got[3:7, ::2])
    raw = ica.build_matrix(iter(maps), 9, 500, tmp_path / "r.f32", standardize=False)
    np.testing.assert_array_equal(raw.load(), np.where(np.isfinite(maps), maps, 0))
    with pytest.raises(ValueError, match="expected 9 maps"):
        ica.build_matrix(iter(maps[:5]), 9, 500, tmp_path / "x.f32", standardize=True)
    with pytest.raises(ValueError, match="more than 4"):
        ica.build_matrix(iter(maps), 4, 500, tmp_path / "x.f32", standardize=True)


def test_select_voxels():
    count = np.array([0, 1, 2, 3, 4])
    np.testing.assert_array_equal(ica.select_voxels(count, 4, "zero", 0.0), [1, 1, 1, 1, 1])
    np.testing.assert_array_equal(ica.select_voxels(count, 4, "zero", 0.5), [0, 0, 1, 1, 1])
    np.testing.assert_array_equal(ica.select_voxels(count, 4, "zero", 1.0), [0, 0, 0, 0, 1])
    np.testing.assert_array_equal(ica.select_voxels(count, 4, "drop", 0.0), [0, 0, 0, 0, 1])
    with pytest.raises(ValueError):
        ica.select_voxels(count, 4, "mean", 0.5)


def test_drop_mode_keeps_voxels_with_data_everywhere(planted, tmp_path):
    summary = run(planted, tmp_path, nodata="drop")
    vol = np.asarray(nib.load(tmp_path / "components.nii.gz").dataobj)
    assert np.isnan(vol[:, :, 21:]).all() and np.isnan(vol[10, 10, 10]).all()
    assert summary["n_voxels_used"] == np.prod(SHAPE) - 24 * 24 * 3 - 27 - 1
    idx, r = match(read_components(tmp_path), planted["patterns"])
    assert np.all(r >= 0.9)


def test_iter_masked_maps_threads_keep_order(planted):
    paths = [planted["root"] / "images" / str(i) / "zmap.nii.gz" for i in planted["ids"][:9]]
    mask = np.ones(SHAPE, bool)
    one = list(ica.iter_masked_maps(paths, mask, threads=1))
    two = list(ica.iter_masked_maps(paths, mask, threads=3))
    for a, b, v in zip(one, two, planted["volumes"][:9], strict=True):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, v.ravel())
    with pytest.raises(ValueError, match="template grid"):
        list(ica.iter_masked_maps(paths[:1], np.ones((3, 3, 3), bool)))


def test_match_components():
    rng = np.random.default_rng(4)
    a = rng.normal(size=(4, 200))
    b = -a[[2, 0, 3, 1]] + 0.01 * rng.normal(size=(4, 200))
    index, r = ica.match_components(a, b)
    assert index.tolist() == [1, 3, 0, 2]
    assert np.all(r > 0.99) and np.all(r <= 1)


def test_too_few_maps_is_a_clear_error(planted, tmp_path):
    with pytest.raises(ValueError, match="n_components=200 is more than the 160 included maps"):
        run(planted, tmp_path, n_components=200)
    qc = tmp_path / "qc.tsv"
    pd.DataFrame({"image_id": [5001], "status": ["included"]}).to_csv(qc, sep="\t", index=False)
    root = planted["root"]
    with pytest.raises(ValueError, match="at least 2 included maps"):
        ica.run_ica(
            qc,
            lambda i: root / "images" / str(i) / "zmap.nii.gz",
            lambda i: root,
            root / "mask.nii.gz",
            defaults("ica"),
            tmp_path / "o",
        )


# --------------------------------------------------------------------------------------------------
# Neurosynth terms through the fixture server
# --------------------------------------------------------------------------------------------------
def neurosynth_replies(ds: dict) -> dict:
    rng = np.random.default_rng(5)
    replies = {}
    for i, iid in enumerate(ds["ids"]):
        if i % 10 == 9:
            continue  # no decode for this image (404)
        values = {w: float(rng.normal(0, 0.05)) for w in NS_WORDS + ["memory", "attention"]}
        values[NS_WORDS[ds["dominant"][i]]] = 0.4 + 0.1 * float(rng.random())
        replies[iid] = {"data": {"values": values}}
    return replies


def test_neurosynth_terms_and_fallback_when_down(planted, tmp_path, caplog):
    from nvmeta.neurovault import make_client
    from nvmeta.neurovault.layout import write_snapshot
    from nvmeta.testing.server import FixtureServer

    snap = write_snapshot(
        tmp_path / "snap", images=[], collections=[], neurosynth=neurosynth_replies(planted)
    )
    cache = tmp_path / "nscache"
    with FixtureServer(snap) as srv:
        nv_cfg = {**defaults("neurovault"), "url": srv.url, "retries": 1, "backoff": 0.0, "timeout": 5}
        kw = {
            "terms": "neurosynth",
            "neurosynth_url": srv.url + "decode/",
            "client_factory": lambda: make_client(nv_cfg),
        }
        root = planted["root"]

        def go(out, log=None):
            base = {
                **defaults("ica"),
                "n_components": N_COMP,
                "terms": kw["terms"],
                "neurosynth_url": kw["neurosynth_url"],
            }
            return ica.run_ica(
                root / "qc.tsv",
                lambda i: root / "images" / str(i) / "zmap.nii.gz",
                lambda i: root / "images" / str(i) / "metadata.json",
                root / "mask.nii.gz",
                base,
                out,
                logger=log,
                client_factory=kw["client_factory"],
                neurosynth_cache_for=lambda i: cache / f"{i}.json",
            )

        # 1. Neurosynth up: its words label the components
        summary = go(tmp_path / "up")
        assert summary["term_source"] == "neurosynth" and summary["term_fallback"] is None
        assert (
            summary["neurosynth"]["n_fetched"] == N_MAPS - N_MAPS // 10
            and summary["neurosynth"]["n_no_words"] == N_MAPS // 10
        )
        decode = [r for r in srv.requests if r.startswith("/api/decode/")]
        assert len(decode) == N_MAPS
        idx, _ = match(read_components(tmp_path / "up"), planted["patterns"])
        terms = pd.read_csv(tmp_path / "up" / "terms.tsv", sep="\t")
        for j, word in enumerate(NS_WORDS):
            assert terms[(terms.component == idx[j]) & (terms["rank"] == 1)]["term"].item() == word
        assert len(list(cache.glob("*.json"))) == N_MAPS - N_MAPS // 10

        # 2. Neurosynth down, cache cleared: fall back to metadata, say so in the log and summary.json,
        #    and stop asking after a few failed requests
        for p in cache.glob("*.json"):
            p.unlink()
        srv.add_fault(r"^/api/decode/", "down", mode="503")
        n_before = len(srv.requests)
        log = logging.getLogger("test.ica.ns")
        with caplog.at_level(logging.WARNING, logger="test.ica.ns"):
            summary = go(tmp_path / "down", log)
        assert summary["term_source"] == "metadata" and summary["term_source_requested"] == "neurosynth"
        assert "Neurosynth is down" in summary["term_fallback"]
        saved = json.loads((tmp_path / "down" / "summary.json").read_text())
        assert saved["term_source"] == "metadata" and any(
            "Neurosynth is down" in w for w in saved["warnings"]
        )
        assert "Neurosynth is down" in caplog.text
        assert len(srv.requests) - n_before <= 3 * 2  # 3 requests in a row, each retried once
        terms = pd.read_csv(tmp_path / "down" / "terms.tsv", sep="\t")
        for j, word in enumerate(WORDS):
            assert terms[(terms.component == idx[j]) & (terms["rank"] == 1)]["term"].item() == word
        # same components whatever the term source
        assert (tmp_path / "up" / "components.nii.gz").read_bytes() == (
            tmp_path / "down" / "components.nii.gz"
        ).read_bytes()


# --------------------------------------------------------------------------------------------------
# convergence: the demo's 21 pain maps with 4 components
# --------------------------------------------------------------------------------------------------
SNAPSHOT = Path(__file__).parent / "data" / "snapshot"
PAIN_IDS = list(range(990001, 990022))


@pytest.fixture(scope="module")
def pain_matrix(tmp_path_factory):
    """The demo's pain analysis as the ICA job sees it: the 21 bundled pain t-maps turned into z-maps on the
    MNI152 2 mm grid by the z-map job's own function (df = n - 1, as config/demo.yaml), then the standardised
    data matrix and its voxel selection."""
    from nvmeta.images.template import load_mask
    from nvmeta.images.zmap import make_zmap

    root = tmp_path_factory.mktemp("pain")
    mask_img = load_mask("mni152_2mm")
    manifest = {e["image_id"]: e["path"] for e in json.loads((SNAPSHOT / "MANIFEST.json").read_text())}
    paths = []
    for i in PAIN_IDS:
        d = root / "images" / str(i)
        d.mkdir(parents=True)
        record = json.loads((SNAPSHOT / "api" / "images" / f"{i}.json").read_text())
        record["nvmeta"] = {"status": "ok"}
        (d / "metadata.json").write_text(json.dumps(record))
        qc = make_zmap(
            d / "metadata.json",
            SNAPSHOT / manifest[i],
            mask_img,
            {**defaults("conversion"), "df": "n-1"},
            d / "zmap.nii.gz",
            d / "qc.json",
            defaults("qc"),
        )
        assert qc["status"] == "included"
        paths.append(d / "zmap.nii.gz")
    pd.DataFrame({"image_id": PAIN_IDS, "status": "included"}).to_csv(root / "qc.tsv", sep="\t", index=False)
    mask, affine = ica.mask_and_affine(mask_img)
    matrix = ica.build_matrix(
        ica.iter_masked_maps(paths, mask, 1, affine),
        len(paths),
        int(mask.sum()),
        root / "m.f32",
        standardize=True,
        labels=PAIN_IDS,
    )
    columns = ica.select_voxels(matrix.count, len(paths), "zero", 0.5)
    return {"root": root, "matrix": matrix, "columns": columns, "mask_img": mask_img}


def test_scikit_learn_fastica_does_not_converge_on_the_demo(pain_matrix):
    """The reason for the stabilised iteration: scikit-learn's own FastICA stops at its 200 iterations."""
    from sklearn.decomposition import FastICA
    from sklearn.exceptions import ConvergenceWarning

    x = pain_matrix["matrix"].load(pain_matrix["columns"]).T
    with pytest.warns(ConvergenceWarning):
        FastICA(n_components=4, random_state=0).fit(x)


def test_defaults_converge_on_the_demo_whatever_the_thread_count(pain_matrix):
    from threadpoolctl import threadpool_limits

    cfg = {**defaults("ica"), "n_components": 4, "random_state": 0, "n_runs": 3}
    out = {}
    for limit in (1, 2):
        with threadpool_limits(limits=limit):
            out[limit] = ica.decompose(pain_matrix["matrix"], pain_matrix["columns"], cfg)
    for dec in out.values():
        assert dec.info["converged"] == [True, True, True]
        # margin: every run converges in under a fifth of the default max_iter
        assert max(dec.info["n_iter"]) < cfg["max_iter"] / 5, dec.info["n_iter"]
    assert out[1].info["n_iter"] == out[2].info["n_iter"]
    np.testing.assert_allclose(out[1].components, out[2].components, rtol=0, atol=1e-5)
    np.testing.assert_allclose(out[1].mixing, out[2].mixing, rtol=1e-6, atol=1e-9)
    # a one-ulp change of the input does not move a converged solution
    x = pain_matrix["matrix"].load(pain_matrix["columns"]).T
    y = x.copy()
    y[::1000, 3] = np.nextafter(y[::1000, 3], np.float32(np.inf))
    a = spatial_fastica(x, 4, 0, cfg["max_iter"], cfg["tol"])
    b = spatial_fastica(y, 4, 0, cfg["max_iter"], cfg["tol"])
    assert a[3] and b[3]
    np.testing.assert_allclose(a[0], b[0], rtol=0, atol=1e-5)


def test_unconverged_run_fails_naming_the_keys(planted, tmp_path, caplog):
    log = logging.getLogger("test.ica.unconverged")
    with caplog.at_level(logging.ERROR, logger="test.ica.unconverged"):
        with pytest.raises(
            ica.NotConverged, match=r"ica\.max_iter=2 .*Raise ica\.max_iter.*ica\.allow_unconverged"
        ):
            run(planted, tmp_path, log=log, max_iter=2, n_runs=2)
    assert "did not converge in 2 of 2 runs" in caplog.text
    # nothing written at an output path, no temporary left
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_allow_unconverged_warns_in_log_summary_and_figure(planted, tmp_path, caplog, monkeypatch):
    log = logging.getLogger("test.ica.allow")
    with caplog.at_level(logging.WARNING, logger="test.ica.allow"):
        summary = run(planted, tmp_path, log=log, max_iter=2, allow_unconverged=True, plots=True)
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["converged"] == [False] and saved["n_iter"] == [2] and saved["allow_unconverged"] is True
    assert any("did not converge" in w and "allow_unconverged" in w for w in saved["warnings"])
    assert "did not converge" in caplog.text
    assert summary["converged"] == [False]
    assert (tmp_path / "component_0.png").is_file()
    from nvmeta.figures import ica_maps

    drawn = {}
    monkeypatch.setattr(ica_maps, "plot_component", lambda *args: drawn.update(args=args))
    component_figure(tmp_path / "components.nii.gz", tmp_path / "summary.json", 0, tmp_path / "c.png")
    assert drawn["args"][3].endswith(
        "\nNOT CONVERGED: FastICA stopped at ica.max_iter (ica.allow_unconverged is true)"
    )


def test_stale_temporaries_are_swept_and_only_ours(planted, tmp_path):
    stale = tmp_path / ".ica_tmp_abcd1234"
    stale.mkdir()
    (stale / "data.f32").write_bytes(b"\0" * 1024)
    part = tmp_path / ".mixing.tsv.k2j4h5g6.part.tsv"
    part.write_text("partial")
    foreign = tmp_path / ".ica_tmp_notours_x"  # not mkdtemp's pattern
    foreign.mkdir()
    keep = tmp_path / "notes.txt"
    keep.write_text("user file")
    summary = run(planted, tmp_path)
    assert summary["converged"] == [True]
    assert not stale.exists() and not part.exists()
    assert foreign.is_dir() and keep.read_text() == "user file"
    assert not list(tmp_path.glob(".ica_tmp_????????"))


def test_failed_run_removes_its_temporary(planted, tmp_path, monkeypatch):
    from nvmeta.ica import run as ica_run

    def boom(*args, **kwargs):
        assert list(tmp_path.glob(".ica_tmp_*/data.f32"))  # the matrix exists while decomposing
        raise RuntimeError("killed")

    monkeypatch.setattr(ica_run, "decompose", boom)
    with pytest.raises(RuntimeError, match="killed"):
        run(planted, tmp_path)
    assert not list(tmp_path.glob(".ica_tmp_*"))


def test_path_lookup_uses_the_declared_inputs(tmp_path):
    from nvmeta.workflow.rule_inputs import path_lookup

    paths = [tmp_path / "results" / "images" / str(i) / "zmap.nii.gz" for i in (7, 12)]
    lookup = path_lookup([str(p) for p in paths], "zmaps")
    assert lookup(12) == paths[1] and lookup(7) == paths[0]
    with pytest.raises(ValueError, match="image 99 is included in qc.tsv but is not among the rule's zmaps"):
        lookup(99)


def test_demo_pain_labels_have_no_author_or_collection_words(pain_matrix, tmp_path):
    """Labels come from the images' own texts and positive loadings only: never the author in the
    collection text ("maumet"), nor the least used terms of a component whose loadings are negative."""
    root = pain_matrix["root"]
    collection = json.loads((SNAPSHOT / "api" / "collections" / "1425.json").read_text())
    for i in PAIN_IDS:  # as the download job writes it: the collection record inside metadata.json
        p = root / "images" / str(i) / "metadata.json"
        record = json.loads(p.read_text())
        record["nvmeta"]["collection"] = collection
        p.write_text(json.dumps(record))
    summary = ica.run_ica(
        root / "qc.tsv",
        lambda i: root / "images" / str(i) / "zmap.nii.gz",
        lambda i: root / "images" / str(i) / "metadata.json",
        pain_matrix["mask_img"],
        {**defaults("ica"), "n_components": 4},
        tmp_path,
    )
    draw_figures(tmp_path, 4)
    assert summary["converged"] == [True]
    terms = pd.read_csv(tmp_path / "terms.tsv", sep="\t")
    assert not set(terms.term) & {"maumet", "nidm", "results", "studies", "dataset", "derived"}
    assert set(terms.term) <= {
        "pain",
        "painful",
        "stimulation",
        "painful stimulation",
        "monitor",
        "discrimination",
        "pain monitor",
        "monitor discrimination",
    }
    assert (terms.weight > 0).all()
    # every image has the same text: the labels cannot tell the components apart, and the summary says so
    assert any("do not tell the components apart" in w for w in summary["warnings"])
    for k in range(4):
        assert (tmp_path / f"component_{k}.png").stat().st_size > 5000
