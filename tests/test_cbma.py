"""CBMA beside IBMA: peaks from the maps, NiMARE CBMA, overlap, NiMARE export.

References: planted truth (synthetic maps with foci at known coordinates), nilearn's own
``get_clusters_table`` on the full volume, NiMARE 0.22 itself (``Dataset.load``, ``ALE`` and
``Stouffers`` in a fresh process), and a hand computation of Dice and peak distances.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from nvmeta import cbma
from nvmeta.cbma import estimate, overlap
from nvmeta.testing.planted import FOCI, NEG_FOCUS, write_planted
from nvmeta.workflow.config import defaults

VOXEL = 2.0


@pytest.fixture(scope="module")
def mask_img():
    from nvmeta.images.template import load_mask

    return load_mask("mni152_2mm")


@pytest.fixture(scope="module")
def planted(tmp_path_factory, mask_img):
    """20 planted maps (one collection each, study = image), their peaks, and ALE/MKDA/KDA runs."""
    root = tmp_path_factory.mktemp("planted") / "results"
    qc_tsv = write_planted(root, mask_img, n_images=20)
    cfg = {**defaults("cbma"), "n_iters": 40, "study": "image", "methods": ["ale", "mkda", "kda"]}
    adir = qc_tsv.parent
    peaks = cbma.peaks_table(
        qc_tsv,
        lambda i: root / "images" / str(i) / "zmap.nii.gz",
        lambda i: root / "images" / str(i) / "qc.json",
        cfg,
        adir / "cbma" / "peaks.tsv",
    )
    summaries = {
        m: estimate.run_cbma(m, adir / "cbma" / "peaks.tsv", mask_img, cfg, adir / "cbma" / m)
        for m in cfg["methods"]
    }
    return {"root": root, "qc": qc_tsv, "adir": adir, "cfg": cfg, "peaks": peaks, "summaries": summaries}


def _dist(a, b) -> float:
    return float(np.linalg.norm(np.asarray(a, float) - np.asarray(b, float)))


# ----------------------------------------------------------------------------------------
# peaks
# ----------------------------------------------------------------------------------------


def test_peaks_at_planted_foci(planted):
    peaks = planted["peaks"]
    assert list(peaks.columns) == cbma.PEAK_COLUMNS
    assert peaks["image_id"].nunique() == 20
    for image_id, group in peaks.groupby("image_id"):
        pos = group[group["sign"] == "positive"]
        neg = group[group["sign"] == "negative"]
        # one peak per planted focus (blobs are smooth: no sub-peak 8 mm away passes)
        assert len(pos) == len(FOCI) and len(neg) == 1
        for focus in FOCI:
            d = np.abs(pos[["x", "y", "z"]].to_numpy() - np.array(focus)).max(axis=1)
            assert d.min() <= VOXEL, (image_id, focus, pos)
        assert np.abs(neg[["x", "y", "z"]].to_numpy()[0] - np.array(NEG_FOCUS)).max() <= VOXEL
        assert (pos["z_value"] > 5).all() and (neg["z_value"] < -4).all()
        # sample size from qc.json (20 + k), not the record's number_of_subjects (999)
        assert set(group["sample_size"]) == {20 + image_id - 1000}
        assert set(group["collection_id"]) == {500 + image_id - 1000}


def test_peaks_equal_nilearn_full_volume():
    """Per-cluster cropping gives nilearn's own full-volume table (coordinates, values, sizes)."""
    from nilearn.reporting import get_clusters_table
    from scipy import ndimage

    rng = np.random.default_rng(3)
    noise = ndimage.gaussian_filter(rng.standard_normal((40, 44, 36)), 2.0)
    z = (noise / noise.std() * 1.6).astype(np.float32)  # smooth noise: many clusters, sub-peaks
    affine = np.array([[-2.0, 0, 0, 40], [0, 2, 0, -50], [0, 0, 2, -20], [0, 0, 0, 1]])
    img = nib.Nifti1Image(z, affine)
    cfg = {
        **defaults("cbma"),
        "min_cluster_voxels": 5,
        "peaks_from": "unthresholded",
        "max_peaks_per_cluster": 4,
    }
    ours = cbma.extract_peaks(img, cfg)
    ref = get_clusters_table(
        img,
        stat_threshold=float(np.nextafter(np.float32(3.1), np.float32(0))),
        cluster_threshold=5,
        two_sided=True,
        min_distance=8.0,
    )
    assert len(ours) > 10 and ours["peak"].str.contains("[a-c]$").any()
    key = ["x", "y", "z"]
    a = ours[key + ["z_value"]].sort_values(key).to_numpy()
    b = ref[["X", "Y", "Z", "Peak Stat"]].astype(float).sort_values(["X", "Y", "Z"]).to_numpy()
    np.testing.assert_allclose(a, b, rtol=1e-6)
    # sizes: the cluster's size on every row of the cluster
    ref_sizes = pd.to_numeric(ref["Cluster Size (mm3)"], errors="coerce").dropna() / 8
    main = ours[~ours["peak"].str.contains("[a-z]$")]
    assert sorted(main["cluster_voxels"]) == sorted(ref_sizes.round().astype(int))


def test_peak_rules_threshold_and_cluster_size(mask_img):
    """|z| >= threshold (inclusive), clusters below min_cluster_voxels give no peak."""
    z = np.zeros(mask_img.shape, np.float32)
    z[40:43, 50:53, 40:43] = 3.1  # 27 voxels exactly at threshold: kept (>=)
    z[41, 51, 41] = 4.0
    z[20:22, 50:52, 40:42] = 8.0  # 8 voxels: below min_cluster_voxels = 10
    z[60:63, 50:53, 40:43] = 3.0999  # below threshold
    z[60, 80, 40] = np.nan
    unthresholded = {**defaults("cbma"), "peaks_from": "unthresholded"}
    out = cbma.extract_peaks(nib.Nifti1Image(z, mask_img.affine), unthresholded)
    assert len(out) == 1
    row = out.iloc[0]
    xyz = mask_img.affine[:3, :3] @ np.array([41, 51, 41]) + mask_img.affine[:3, 3]
    assert (row["x"], row["y"], row["z"]) == tuple(xyz)
    assert row["z_value"] == pytest.approx(4.0) and row["cluster_voxels"] == 27
    empty = cbma.extract_peaks(
        nib.Nifti1Image(np.full(mask_img.shape, np.nan, np.float32), mask_img.affine), defaults("cbma")
    )
    assert empty.empty and list(empty.columns) == ["sign", "peak", "x", "y", "z", "z_value", "cluster_voxels"]


def test_experiments_pool_a_collection():
    peaks = pd.DataFrame(
        {
            "image_id": [1, 1, 2, 3, 3],
            "collection_id": [10, 10, 10, 11, 11],
            "sign": ["positive", "positive", "positive", "positive", "negative"],
            "peak": ["1", "2", "1", "1", "2"],
            "x": [0.0, 10.0, 20.0, 30.0, 40.0],
            "y": [0.0] * 5,
            "z": [0.0] * 5,
            "z_value": [4.0, 3.5, 5.0, 4.2, -4.0],
            "cluster_voxels": [10] * 5,
            "sample_size": [20, 20, 30, None, None],
        }
    )
    by_coll = estimate._experiments(peaks, "collection", "positive")
    assert [e["id"] for e in by_coll] == ["collection-10", "collection-11"]
    assert by_coll[0]["x"] == [0.0, 10.0, 20.0] and by_coll[0]["sample_sizes"] == [20, 30]
    assert by_coll[0]["image_ids"] == [1, 2]
    assert by_coll[1]["sample_sizes"] is None  # image 3 has no n: ALE must leave it out
    by_image = estimate._experiments(peaks, "image", "negative")
    assert [(e["id"], e["x"]) for e in by_image] == [("image-3", [40.0])]


# ----------------------------------------------------------------------------------------
# CBMA
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["ale", "mkda", "kda"])
def test_cbma_maxima_at_planted_foci(planted, method):
    d = planted["adir"] / "cbma" / method
    for name in estimate.BASE_MAPS + estimate.FWE_MAPS:
        assert (d / f"{name}.nii.gz").is_file(), name
    stat_img = nib.load(d / "stat.nii.gz")
    stat = np.nan_to_num(np.asarray(stat_img.dataobj, dtype=np.float64))
    aff = stat_img.affine
    ijk = np.indices(stat.shape).reshape(3, -1)
    xyz = ((aff[:3, :3] @ ijk).T + aff[:3, 3]).reshape(*stat.shape, 3)

    # The global maximum, and the maximum near each focus, are at a planted focus. MKDA/KDA
    # densities are plateaus (sum of 10 mm spheres): the centre of the voxels at the maximum is.
    def centre_of_max(sel):
        vals = np.where(sel, stat, -np.inf)
        top = vals >= vals.max() - 1e-6 * abs(vals.max())
        return xyz[top].mean(axis=0)

    from scipy import ndimage

    top = stat >= stat.max() * (1 - 1e-6)
    labels, n_top = ndimage.label(top)
    for k in range(1, n_top + 1):  # every component of the global maximum is at a focus
        assert min(_dist(xyz[labels == k].mean(axis=0), f) for f in FOCI) <= VOXEL * np.sqrt(3)
    for focus in FOCI:
        near = np.linalg.norm(xyz - np.array(focus), axis=-1) <= 12
        assert _dist(centre_of_max(near), focus) <= VOXEL * np.sqrt(3), (method, focus, centre_of_max(near))
    summary = json.loads((d / "summary.json").read_text())
    assert summary["n_experiments"] == 20 and summary["n_foci"] == 60
    assert summary["n_significant_cluster_fwe"] > 0
    # the significant clusters contain the foci; clusters.tsv lists them
    logp = np.asarray(nib.load(d / f"{estimate.LEVEL_MAPS['cluster']}.nii.gz").dataobj)
    sig = estimate.significant_mask(logp, 0.05)
    inv = np.linalg.inv(aff)
    for focus in FOCI:
        i, j, k = np.round(inv[:3, :3] @ np.array(focus) + inv[:3, 3]).astype(int)
        assert sig[i, j, k], (method, focus)
    clusters = pd.read_csv(d / "clusters.tsv", sep="\t")
    assert summary["n_clusters"] == 3 == clusters["Cluster Size (mm3)"].notna().sum()
    assert (d / "z.png").stat().st_size > 10_000


def test_ale_without_sample_size_is_left_out(tmp_path, mask_img):
    qc_tsv = write_planted(
        tmp_path / "results", mask_img, n_images=3, sample_size_of=lambda k: None if k == 1 else 25
    )
    cfg = {**defaults("cbma"), "n_iters": 5, "study": "image"}
    images = tmp_path / "results" / "images"
    peaks_tsv = qc_tsv.parent / "cbma" / "peaks.tsv"
    cbma.peaks_table(
        qc_tsv,
        lambda i: images / str(i) / "zmap.nii.gz",
        lambda i: images / str(i) / "qc.json",
        cfg,
        peaks_tsv,
    )
    s = estimate.run_cbma("ale", peaks_tsv, mask_img, cfg, qc_tsv.parent / "cbma" / "ale")
    assert s["n_experiments"] == 2
    assert any("images [1001]" in w for w in s["warnings"])
    assert any("fewer than ~17" in w for w in s["warnings"])
    # 5 iterations: the smallest Monte-Carlo p is 0.2, so nothing is significant, and it says so
    assert any("n_iters=5 is too small" in w for w in s["warnings"])
    assert s["n_significant_cluster_fwe"] == 0


def test_cbma_with_no_peak_says_why(tmp_path, mask_img):
    peaks_tsv = tmp_path / "peaks.tsv"
    pd.DataFrame(columns=cbma.PEAK_COLUMNS).to_csv(peaks_tsv, sep="\t", index=False)
    with pytest.raises(ValueError, match="no included map has a positive peak"):
        estimate.run_cbma("mkda", peaks_tsv, mask_img, {**defaults("cbma"), "n_iters": 5}, tmp_path / "out")
    assert not (tmp_path / "out" / "z.nii.gz").exists()


# ----------------------------------------------------------------------------------------
# overlap
# ----------------------------------------------------------------------------------------


def _save(data, affine, path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(data, np.float32), affine), path)


def test_overlap_dice_and_peak_distance_by_hand(tmp_path):
    shape = (20, 20, 20)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    mask_img = nib.Nifti1Image(np.ones(shape, np.int8), affine)
    # IBMA: a 4x4x4 box (64 voxels, z falling off from 6 at (3,3,3)) and a negative box (ignored
    # with sign=positive)
    ibma = np.zeros(shape)
    box = np.indices((4, 4, 4)).transpose(1, 2, 3, 0) + 2  # voxels 2..5
    ibma[2:6, 2:6, 2:6] = 6.0 - 0.5 * np.linalg.norm(box - 3, axis=-1)  # one local maximum
    ibma[12:14, 12:14, 12:14] = -5.0
    ibma[0, 19, 19] = np.nan
    _save(ibma, affine, tmp_path / "meta" / "stouffer" / "z_fdr.nii.gz")
    # CBMA cluster level: box shifted by 2 in x (4 x 4 x 4, overlap 2 x 4 x 4 = 32), peak at (5,4,4)
    # plus a separate 2x2x2 cluster (8 voxels) that no IBMA cluster touches
    z = np.zeros(shape)
    z[4:8, 2:6, 2:6] = 2.0
    z[5, 4, 4] = 4.0
    logp_cluster = np.zeros(shape)
    logp_cluster[4:8, 2:6, 2:6] = 2.0
    logp_cluster[15:17, 1:3, 1:3] = 1.5
    z[15:17, 1:3, 1:3] = 3.0
    logp_voxel = np.zeros(shape)
    logp_voxel[5, 4, 4] = 3.0  # one voxel
    logp_voxel[5, 5, 5] = 1.0  # p = 0.1: not significant
    d = tmp_path / "cbma" / "ale"
    _save(z, affine, d / "z.nii.gz")
    _save(logp_cluster, affine, d / f"{estimate.LEVEL_MAPS['cluster']}.nii.gz")
    _save(logp_voxel, affine, d / f"{estimate.LEVEL_MAPS['voxel']}.nii.gz")
    cfg = {**defaults("cbma"), "sign": "positive", "cluster_threshold": 0.05}
    table = overlap.overlap(
        {"stouffer": tmp_path / "meta" / "stouffer"},
        {"ale": d},
        mask_img,
        cfg,
        tmp_path / "overlap.tsv",
        tmp_path / "overlap_clusters.tsv",
        tmp_path / "overlap.png",
    )
    on_disk = pd.read_csv(tmp_path / "overlap.tsv", sep="\t")
    assert list(on_disk.columns) == overlap.OVERLAP_COLUMNS
    cl = on_disk[on_disk.cbma_level == "cluster"].iloc[0]
    assert (cl.n_ibma, cl.n_cbma, cl.n_both) == (64, 72, 32)
    assert cl.dice == pytest.approx(2 * 32 / (64 + 72))
    assert (cl.n_cbma_clusters, cl.n_matched_clusters) == (2, 1)
    # peaks (5,4,4) vs (3,3,3) voxels: 2 mm * |(2,1,1)|
    assert cl.peak_distance_median_mm == pytest.approx(2 * np.sqrt(6))
    vx = on_disk[on_disk.cbma_level == "voxel"].iloc[0]
    assert (vx.n_cbma, vx.n_both) == (1, 1)
    assert vx.dice == pytest.approx(2 * 1 / 65)
    assert vx.peak_distance_median_mm == pytest.approx(2 * np.sqrt(6))
    clusters = pd.read_csv(tmp_path / "overlap_clusters.tsv", sep="\t")
    assert len(clusters) == 3 and clusters["peak_distance_mm"].isna().sum() == 1
    assert len(table) == 2 and (tmp_path / "overlap.png").stat().st_size > 5_000
    # the negative sign compares with the negative IBMA box (8 voxels), which no CBMA voxel touches
    neg = overlap.overlap(
        {"stouffer": tmp_path / "meta" / "stouffer"},
        {"ale": d},
        mask_img,
        {**cfg, "sign": "negative"},
        tmp_path / "o2.tsv",
        tmp_path / "o2c.tsv",
    )
    assert neg.iloc[0].n_ibma == 8 and neg.iloc[0].n_both == 0 and neg.iloc[0].dice == 0.0


# ----------------------------------------------------------------------------------------
# NiMARE export, checked with NiMARE itself in a fresh process
# ----------------------------------------------------------------------------------------


def test_studyset_content(planted, mask_img):
    from nvmeta.cbma.export import export

    adir = planted["adir"]
    ss, dset = export(
        planted["qc"],
        adir / "cbma" / "peaks.tsv",
        planted["root"],
        "planted",
        mask_img,
        adir / "nimare" / "studyset.json",
        adir / "nimare" / "dataset.pkl.gz",
    )
    on_disk = json.loads((adir / "nimare" / "studyset.json").read_text())
    assert on_disk == json.loads(json.dumps(ss))
    assert len(on_disk["studies"]) == 20  # one per collection
    study = on_disk["studies"][0]
    assert study["metadata"]["doi"] == "10.9999/planted.500" and study["id"] == "500"
    pos, neg = study["analyses"]
    assert (pos["id"], neg["id"]) == ("1000", "1000_neg")
    assert pos["metadata"]["sample_sizes"] == [20]  # qc.json n, not the record's 999
    assert pos["metadata"]["cognitive_atlas_task"] == "pain monitor/discrimination task"
    assert pos["metadata"]["contrast"] == "painful heat vs warm"
    assert pos["metadata"]["neurovault_image_id"] == 1000 and pos["metadata"]["doi"] == "10.9999/planted.500"
    assert [im["value_type"] for im in pos["images"]] == ["Z map"] and neg["images"] == []
    assert (planted["root"] / pos["images"][0]["url"]).is_file()
    assert len(pos["points"]) == 3 and len(neg["points"]) == 1
    assert neg["points"][0]["values"][0]["value"] < 0
    peaks = planted["peaks"]
    assert sum(len(a["points"]) for s in on_disk["studies"] for a in s["analyses"]) == len(peaks)


_FRESH = textwrap.dedent(
    """
    import json, sys, warnings
    import numpy as np
    warnings.simplefilter("ignore")
    from nimare.dataset import Dataset
    from nimare.nimads import Studyset
    from nimare.meta.cbma import ALE
    from nimare.meta.ibma import Stouffers

    adir, results, out = sys.argv[1:4]
    dset = Dataset.load(adir + "/nimare/dataset.pkl.gz")
    studyset = Studyset(adir + "/nimare/studyset.json", basepath=results)
    pos = dset.metadata.loc[dset.metadata["sign"] == "positive", "id"].tolist()
    ale = ALE().fit(dset.slice(pos))
    sto = Stouffers(use_sample_size=False).fit(dset)
    np.save(out + "/ale_z.npy", ale.get_map("z", return_type="array"))
    np.save(out + "/sto_z.npy", sto.get_map("z", return_type="array"))
    np.save(out + "/mask.npy", np.asarray(dset.masker.mask_img.dataobj) > 0)
    json.dump({"n_studyset": len(studyset.ids), "n_dset": len(dset.ids),
               "n_z": int(dset.images["z"].notna().sum()),
               "coords": dset.coordinates.columns.tolist(),
               "images": studyset.images["z"].dropna().tolist()[:1]},
              open(out + "/info.json", "w"))
    """
)


def test_nimare_reads_the_export_and_agrees(planted, mask_img, tmp_path):
    """Fresh process: Dataset.load + NiMARE's ALE equals nvmeta's ale z; NiMARE's Stouffers
    on the exported z images equals nvmeta's stouffer on their common voxels."""
    from nvmeta.meta import combine

    test_studyset_content(planted, mask_img)  # writes the export (idempotent)
    adir = planted["adir"]
    script = tmp_path / "fresh.py"
    script.write_text(_FRESH)
    subprocess.run(
        [sys.executable, str(script), str(adir), str(planted["root"]), str(tmp_path)],
        check=True,
        timeout=1200,
    )
    info = json.loads((tmp_path / "info.json").read_text())
    assert info["n_dset"] == info["n_studyset"] == 40 and info["n_z"] == 20
    assert {"z_stat", "cluster_voxels"} <= set(info["coords"])
    mask = np.load(tmp_path / "mask.npy")
    # ALE: NiMARE on the exported peaks == nvmeta's output (same masker: the template)
    ours = np.asarray(nib.load(adir / "cbma" / "ale" / "z.nii.gz").dataobj, dtype=np.float64)[mask]
    np.testing.assert_allclose(np.load(tmp_path / "ale_z.npy"), ours, atol=1e-4)
    # Stouffer: NiMARE keeps the voxels where every map has data
    ids = pd.read_csv(planted["qc"], sep="\t")["image_id"]
    zs = np.stack(
        [np.asarray(nib.load(planted["root"] / "images" / str(i) / "zmap.nii.gz").dataobj)[mask] for i in ids]
    )
    z_nv, _, _ = combine("stouffer", zs)
    z_ni = np.load(tmp_path / "sto_z.npy")
    common = np.all(np.isfinite(zs), axis=0) & np.isfinite(z_ni)
    assert common.sum() > 100_000
    np.testing.assert_allclose(z_ni[common], z_nv[common], atol=1e-4)


# ----------------------------------------------------------------------------------------
# config
# ----------------------------------------------------------------------------------------


def test_cbma_config_block(tmp_path):
    import yaml

    from nvmeta.errors import ConfigError
    from nvmeta.workflow.config import SCHEMA_PATH, check_config

    node = yaml.safe_load(SCHEMA_PATH.read_text())["$defs"]["cbma"]
    for key, sub in node["properties"].items():  # every key has a description and a default
        assert sub.get("description") and "default" in sub, key
    snapshot = Path(__file__).parent / "data" / "snapshot"

    def config(cbma_block):
        return {
            "neurovault": {"url": str(snapshot)},
            "analyses": {"a": {"image_ids": [1], "cbma": cbma_block}},
        }

    cfg = check_config(config({}), SCHEMA_PATH)
    assert cfg["analyses"]["a"]["cbma"] == defaults("cbma")
    with pytest.raises(ConfigError, match=r"analyses\.a\.cbma\.methods\.0"):
        check_config(config({"methods": ["sdm"]}), SCHEMA_PATH)
    with pytest.raises(ConfigError, match=r"analyses\.a\.cbma\.n_iter: unknown key"):
        check_config(config({"n_iter": 10}), SCHEMA_PATH)


def test_stale_temporaries_are_swept(tmp_path, mask_img):
    """A killed earlier attempt's .part files next to the outputs are removed by the next one."""
    qc_tsv = write_planted(tmp_path / "results", mask_img, n_images=1)
    out = qc_tsv.parent / "cbma" / "peaks.tsv"
    out.parent.mkdir(parents=True)
    stale = out.parent / ".peaks.tsv.abcd1234.part.tsv"
    stale.write_text("partial")
    images = tmp_path / "results" / "images"
    cbma.peaks_table(
        qc_tsv,
        lambda i: images / str(i) / "zmap.nii.gz",
        lambda i: images / str(i) / "qc.json",
        defaults("cbma"),
        out,
    )
    assert not stale.exists() and len(pd.read_csv(out, sep="\t")) == 4


# ----------------------------------------------------------------------------------------
# peaks from each map's own corrected inference
# ----------------------------------------------------------------------------------------

PLANTED_FOCI_VOX = [(15, 20, 15, 7.0), (45, 20, 15, 7.0), (30, 50, 40, 7.0), (30, 35, 28, -7.0)]


def _smooth_null(rng, shape, sigma, pad=12):
    """A stationary unit-variance Gaussian field (white noise smoothed, the padding cropped)."""
    from scipy import ndimage

    f = ndimage.gaussian_filter(rng.standard_normal(tuple(s + 2 * pad for s in shape)), sigma)
    f = f[pad:-pad, pad:-pad, pad:-pad]
    return f / f.std()


@pytest.fixture(scope="module")
def planted_map():
    """Smooth noise (FWHM 3.5 voxels, 7 mm) plus three positive foci and one negative (sd 3 voxels), 2 mm grid."""
    rng = np.random.default_rng(11)
    shape = (60, 72, 60)
    z = _smooth_null(rng, shape, 1.5)
    grid = np.indices(shape).astype(float)
    for i, j, k, amp in PLANTED_FOCI_VOX:
        z += amp * np.exp(-((grid[0] - i) ** 2 + (grid[1] - j) ** 2 + (grid[2] - k) ** 2) / (2 * 3.0**2))
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    z[:2] = np.nan  # no data: never a peak, not a test
    return nib.Nifti1Image(z.astype(np.float32), affine)


@pytest.mark.parametrize("correction", ["cluster_fwe", "ari", "fdr", "bonferroni"])
def test_corrected_peaks_recover_planted_foci_and_not_the_noise(planted_map, correction):
    cfg = {**defaults("cbma"), "peak_correction": correction}
    peaks, summary = cbma.peaks.map_peaks(planted_map, cfg)
    xyz = peaks[["x", "y", "z"]].to_numpy()
    foci = np.array([f[:3] for f in PLANTED_FOCI_VOX], float) * 2.0
    signs = np.array([np.sign(f[3]) for f in PLANTED_FOCI_VOX])
    # every planted focus has a peak of its sign within 6 mm (3 voxels: the noise moves the maximum)
    for focus, sign in zip(foci, signs, strict=True):
        same = peaks["z_value"].to_numpy() * sign > 0
        assert np.linalg.norm(xyz[same] - focus, axis=1).min() <= 6.0, (correction, focus)
    d = np.linalg.norm(xyz[:, None, :] - foci[None], axis=2).min(axis=1)
    if correction == "fdr":
        # FDR bounds the share of false voxels, not their number: surviving voxels where the blobs
        # are < 0.01 (> 21 mm from every focus) are at most 10 % of the surviving voxels
        z = np.asarray(planted_map.dataobj)
        ijk = np.indices(z.shape).reshape(3, -1).T * 2.0
        far = (np.linalg.norm(ijk[:, None, :] - foci[None], axis=2).min(axis=1) > 21.4).reshape(z.shape)
        above = np.zeros(z.shape, bool)
        for s in summary:
            sign = 1.0 if s["sign"] == "positive" else -1.0
            above |= np.nan_to_num(sign * z, nan=-np.inf) > s["z_threshold"]
        assert (above & far).sum() <= 0.1 * above.sum()
    else:
        # family-wise: every peak is on a planted focus's blob (within 12 mm), no noise peak survives
        assert d.max() <= 12.0, (correction, peaks[d > 12.0])
    # at most max_peaks_per_cluster (3) per cluster
    assert peaks["peak"].str.replace("[0-9]+", "", regex=True).isin(["", "a", "b"]).all()
    assert {s["sign"] for s in summary} == {"positive", "negative"}


def test_uncorrected_peaks_include_the_noise(planted_map):
    """The old extraction (|z| >= 3.1, every cluster of >= 10 voxels) takes noise clusters too."""
    cfg = {**defaults("cbma"), "peaks_from": "unthresholded", "max_peaks_per_cluster": 4}
    peaks = cbma.extract_peaks(planted_map, cfg)
    foci = np.array([f[:3] for f in PLANTED_FOCI_VOX], float) * 2.0
    d = np.linalg.norm(peaks[["x", "y", "z"]].to_numpy()[:, None, :] - foci[None], axis=2).min(axis=1)
    assert (d > 12.0).sum() >= 3


def test_max_peaks_per_cluster_keeps_nilearns_first_rows():
    from scipy import ndimage

    rng = np.random.default_rng(3)
    noise = ndimage.gaussian_filter(rng.standard_normal((40, 44, 36)), 2.0)
    img = nib.Nifti1Image((noise / noise.std() * 1.6).astype(np.float32), np.diag([2.0, 2, 2, 1]))
    cfg = {**defaults("cbma"), "peaks_from": "unthresholded", "min_cluster_voxels": 5}
    four = cbma.extract_peaks(img, {**cfg, "max_peaks_per_cluster": 4})
    assert four["peak"].str.endswith("a").any()  # clusters with sub-peaks exist
    assert len(cbma.extract_peaks(img, {**cfg, "max_peaks_per_cluster": 1})) < len(four)
    for m in (1, 2, 3):
        got = cbma.extract_peaks(img, {**cfg, "max_peaks_per_cluster": m})
        keep = four["peak"].str.replace("[0-9]+", "", regex=True).isin(["", "a", "b"][:m])
        pd.testing.assert_frame_equal(got.reset_index(drop=True), four[keep].reset_index(drop=True))


def test_voxel_level_thresholds_equal_an_independent_computation(planted_map):
    """fdr: Benjamini-Hochberg (statsmodels) on the one-sided p of the map's voxels; bonferroni: alpha / n."""
    from scipy.stats import norm
    from statsmodels.stats.multitest import multipletests

    z = np.asarray(planted_map.dataobj, dtype=np.float32)
    valid = np.isfinite(z)
    data = np.where(valid, z, 0).astype(np.float32)
    for sign in (1.0, -1.0):
        p = norm.sf(sign * z[valid].astype(np.float64))
        reject = multipletests(p, alpha=0.05, method="fdr_bh")[0]
        got = cbma.peaks.surviving(
            data, valid, planted_map.affine, sign, {**defaults("cbma"), "peak_correction": "fdr"}
        )
        assert reject.sum() > 100 and np.array_equal(got["above"][valid], reject)
        bonf = cbma.peaks.surviving(data, valid, planted_map.affine, sign, {**defaults("cbma"), "peak_correction": "bonferroni"})  # fmt: skip
        assert bonf["z_threshold"] == pytest.approx(norm.isf(0.05 / valid.sum()))
        assert np.array_equal(bonf["above"][valid], sign * z[valid] > bonf["z_threshold"])


def test_ari_keeps_every_cluster_with_a_hommel_rejection():
    """A cluster holding a voxel Hommel's procedure rejects (statsmodels) has a true discovery (ARI)."""
    from scipy import ndimage
    from scipy.stats import norm
    from statsmodels.stats.multitest import multipletests

    rng = np.random.default_rng(4)
    shape = (18, 18, 18)
    z = _smooth_null(rng, shape, 1.0, pad=4)
    z[4:8, 4:8, 4:8] += 4.5
    z[12:15, 11:14, 10:13] += 2.8  # weaker: may or may not pass
    valid = np.ones(shape, bool)
    cfg = {**defaults("cbma"), "peak_correction": "ari"}
    got = cbma.peaks.surviving(z.astype(np.float32), valid, np.eye(4), 1.0, cfg)["above"]
    hommel = multipletests(norm.sf(z.ravel()), alpha=0.05, method="hommel")[0].reshape(shape)
    labels, n = ndimage.label(z > 3.1)
    assert hommel.any()
    for k in range(1, n + 1):
        if (hommel & (labels == k)).any():
            assert got[labels == k].all(), k
    assert not (got & (labels == 0)).any()


def test_rft_smoothness_and_cluster_fwe_on_null_fields():
    """Random field theory on simulated null fields: the FWHM of the kernel is recovered and the
    family-wise rate of cluster_fwe is at most alpha (RFT is conservative at these smoothnesses), while
    every null field has a cluster above 3.1 (uncorrected cluster peaks would all be false)."""
    from scipy import ndimage

    from nvmeta.cbma.rft import critical_cluster_size, smoothness_fwhm

    rng = np.random.default_rng(0)
    shape = (48, 48, 48)
    sigma = 2.0
    hits = {0.05: 0, 0.5: 0}
    any_cluster = 0
    fwhms = []
    n = 80
    for _ in range(n):
        f = _smooth_null(rng, shape, sigma)
        fwhm = smoothness_fwhm(f, np.ones(shape, bool))
        fwhms.append(fwhm)
        labels, m = ndimage.label(f > 3.1)
        biggest = np.bincount(labels.ravel())[1:].max() if m else 0
        any_cluster += m > 0
        for alpha in hits:
            hits[alpha] += biggest >= critical_cluster_size(f.size, fwhm, 3.1, alpha)
    assert np.mean(fwhms, axis=0) == pytest.approx([np.sqrt(8 * np.log(2)) * sigma] * 3, rel=0.03)
    assert hits[0.05] / n <= 0.05 + 2 * np.sqrt(0.05 * 0.95 / n)
    assert 0.2 <= hits[0.5] / n <= 0.6  # calibrated, not vacuous
    assert any_cluster == n


def test_peak_thresholds_table(tmp_path, mask_img):
    qc_tsv = write_planted(tmp_path / "results", mask_img, n_images=2)
    root = tmp_path / "results"
    out = qc_tsv.parent / "cbma" / "peaks.tsv"
    thr = qc_tsv.parent / "cbma" / "peak_thresholds.tsv"
    cbma.peaks_table(qc_tsv, lambda i: root / "images" / str(i) / "zmap.nii.gz",
                     lambda i: root / "images" / str(i) / "qc.json", defaults("cbma"), out, thresholds_tsv=thr)  # fmt: skip
    t = pd.read_csv(thr, sep="\t")
    assert list(t.columns) == cbma.peaks.THRESHOLD_COLUMNS
    assert len(t) == 4 and set(t["correction"]) == {"cluster_fwe"} and (t["cluster_k"] >= 1).all()
    peaks = pd.read_csv(out, sep="\t")
    counts = peaks.groupby(["image_id", "sign"]).size()
    for row in t.itertuples():
        assert counts.get((row.image_id, row.sign), 0) == row.n_peaks
