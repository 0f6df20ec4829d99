"""Issue 14, meta parts: cluster tables and mosaics that say what they show."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from nvmeta.meta import outputs, run_method

AFFINE = np.array([[2.0, 0, 0, -20], [0, 2.0, 0, -20], [0, 0, 2.0, -12], [0, 0, 0, 1]])
SHAPE = (20, 20, 12)


def _study(tmp_path, signal: np.ndarray, k: int = 6, seed: int = 0):
    mask = np.zeros(SHAPE, np.uint8)
    mask[1:-1, 1:-1, 1:-1] = 1
    mask_img = nib.Nifti1Image(mask, AFFINE)
    m = mask > 0
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(k):
        d = tmp_path / "images" / str(i + 1)
        d.mkdir(parents=True, exist_ok=True)
        z = np.where(m, rng.normal(size=SHAPE) * 0.5 + signal, np.nan).astype(np.float32)
        nib.save(nib.Nifti1Image(z, AFFINE), d / "zmap.nii.gz")
        (d / "qc.json").write_text(json.dumps({"n": 20}))
        rows.append(
            {"image_id": i + 1, "collection_id": i + 1, "number_of_subjects": 20, "status": "included"}
        )
    pd.DataFrame(rows).to_csv(tmp_path / "qc.tsv", sep="\t", index=False)
    return mask_img, (lambda i: tmp_path / "images" / str(i) / "zmap.nii.gz")


def _blobs():
    s = np.zeros(SHAPE)
    s[3:7, 3:7, 3:7] = 3.0  # 64 voxels
    s[12:13, 3:4, 3:4] = 3.0  # a 1-voxel speck (dropped: min_cluster_voxels)
    s[13:17, 13:17, 5:9] = -3.0  # 64 voxels, negative
    s[3:4, 15:16, 8:9] = 3.0  # another speck
    s[8:11, 14:17, 2:5] = 3.0  # 27 voxels
    return s


def test_cluster_ids_contiguous_with_threshold_and_connectivity(tmp_path):
    mask_img, path_for = _study(tmp_path, _blobs())
    summary = run_method("stouffer", tmp_path / "qc.tsv", path_for, mask_img,
                         {"cut_coords": [0], "min_cluster_voxels": 10}, tmp_path / "out")  # fmt: skip
    t = pd.read_csv(tmp_path / "out" / "clusters.tsv", sep="\t", dtype={"Cluster ID": str})
    main = t[t["Cluster Size (voxels)"].notna()]
    assert main["Cluster ID"].tolist() == ["1", "2", "3"]  # no gap where the specks were dropped
    assert sorted(main["Cluster Size (voxels)"].astype(int)) == [27, 64, 64]
    sub = t[t["Cluster Size (voxels)"].isna()]["Cluster ID"]
    assert all(s.rstrip("abcdefghij") in {"1", "2", "3"} for s in sub)
    forming = t["Cluster-forming threshold"].unique().tolist()
    assert len(forming) == 1 and forming[0].startswith("FDR q < 0.05 (|z| >= ")
    assert (t["Connectivity"] == "faces (6-connected)").all()
    assert summary["n_clusters_fdr"] == 3 and summary["cluster_connectivity"] == "faces (6-connected)"


def test_brain_wide_cluster_warns_and_cluster_threshold_z_splits_it(tmp_path):
    s = np.full(SHAPE, 1.5)  # weak effect everywhere (FDR keeps nearly every voxel: one cluster)
    s[3:7, 3:7, 3:7] = 4.0
    s[13:17, 13:17, 5:9] = 4.0
    mask_img, path_for = _study(tmp_path, s)
    summary = run_method("stouffer", tmp_path / "qc.tsv", path_for, mask_img, {"cut_coords": [0]},
                         tmp_path / "out")  # fmt: skip
    assert any(
        "% of the reported voxels" in w and "meta.cluster_threshold_z" in w for w in summary["warnings"]
    )
    assert summary["n_clusters_fdr"] == 1
    strict = run_method("stouffer", tmp_path / "qc.tsv", path_for, mask_img,
                        {"cut_coords": [0], "cluster_threshold_z": 7.0}, tmp_path / "strict")  # fmt: skip
    t = pd.read_csv(tmp_path / "strict" / "clusters.tsv", sep="\t")
    main = t[t["Cluster Size (voxels)"].notna()]
    assert len(main) == 2 and (main["Cluster Size (voxels)"] <= 64).all()
    assert "|z| >= 7 (meta.cluster_threshold_z)" in t["Cluster-forming threshold"].iloc[0]
    assert not any("% of the reported voxels" in w for w in strict["warnings"])
    # the thresholded maps themselves are unchanged: only the tables use the stricter threshold
    a = np.asarray(nib.load(tmp_path / "out" / "z_fdr.nii.gz").dataobj)
    b = np.asarray(nib.load(tmp_path / "strict" / "z_fdr.nii.gz").dataobj)
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("signal", [3.0, 0.0])
def test_mosaic_title_and_empty_note(tmp_path, monkeypatch, signal):
    seen = {}
    real = outputs.plot_z

    def spy(img, png, cfg, title, empty_note=None):
        seen.update(
            title=title, note=empty_note, nonzero=int(np.count_nonzero(np.nan_to_num(img.get_fdata())))
        )
        return real(img, png, cfg, title, empty_note)

    monkeypatch.setattr(outputs, "plot_z", spy)
    s = np.zeros(SHAPE)
    s[3:7, 3:7, 3:7] = signal
    mask_img, path_for = _study(tmp_path, s, seed=3)
    summary = run_method("stouffer", tmp_path / "qc.tsv", path_for, mask_img, {"cut_coords": [0, 4]},
                         tmp_path / "out")  # fmt: skip
    # nilearn hides |z| <= threshold (np.ma.masked_inside): what is shown is |z| > 3
    assert seen["title"] == "Stouffer, 6 maps: z where FDR q < 0.05, |z| > 3 shown"
    assert seen["note"] == "no voxel survives FDR q < 0.05 with |z| > 3"
    # the figure shows the FDR map: what survives, nothing else
    assert seen["nonzero"] == summary["n_significant_fdr"]
    assert (summary["n_significant_fdr"] > 0) == (signal > 0)
    assert (tmp_path / "out" / "z.png").stat().st_size > 5000
