"""The plausibility check of every meta method's z (nvmeta.meta.plausibility) and its use in
``summary.json``: references are hand computations and Stouffer's z of k equal maps."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from nvmeta.meta import run_method
from nvmeta.meta.plausibility import check

AFFINE = np.diag([3.0, 3.0, 3.0, 1.0])
SHAPE = (8, 8, 6)


def test_check_by_hand():
    z = np.array([3.0, -5.0, 9.0, 2.0, np.nan, 40.0])
    k = np.array([4, 4, 4, 2, 0, 5])
    bound = np.array([4.0, 6.0, 8.0, 1.0, np.nan, 50.0])
    reported = np.array([True, True, True, True, False, False])
    out = check("m", z, k, reported, bound, two_sided=True)
    # 9 > 8 and 2 > 1 are over; 40 is not reported; the peak (9) is over
    assert out["ok"] is False and out["peak_ok"] is False and out["n_voxels_over_bound"] == 2
    assert out["z_peak"] == 9.0 and out["bound_at_peak"] == 8.0 and out["k_at_peak"] == 4
    assert out["worst"] == {"z": 2.0, "bound": 1.0, "k": 2}  # furthest over: ratio 2
    assert "2 reported voxel(s)" in out["message"] and "peak z = 9.0" in out["message"]
    # one-sided: only positive z can be significant, so -5 is not checked
    z1 = np.array([3.0, -7.0, 2.0])
    out1 = check("m", z1, np.array([4, 4, 4]), np.ones(3, bool), np.array([4.0, 6.0, 4.0]), two_sided=False)
    assert out1["ok"] is True and out1["message"] == "" and out1["z_peak"] == 3.0
    out2 = check("m", z1, np.array([4, 4, 4]), np.ones(3, bool), np.array([4.0, 6.0, 4.0]), two_sided=True)
    assert out2["ok"] is False and out2["peak_ok"] is False  # |-7| > 6, and it is the peak
    assert check("m", z, k, reported, None, True)["ok"] is None


def _study(root: Path, zs: list[np.ndarray]) -> tuple[Path, nib.Nifti1Image, np.ndarray]:
    mask = np.zeros(SHAPE, np.uint8)
    mask[1:-1, 1:-1, 1:-1] = 1
    mask_img = nib.Nifti1Image(mask, AFFINE)
    rows = []
    for i, z in enumerate(zs, start=1):
        d = root / "images" / str(i)
        d.mkdir(parents=True)
        data = np.full(SHAPE, np.nan, np.float32)
        data[mask > 0] = z
        nib.save(nib.Nifti1Image(data, AFFINE), d / "zmap.nii.gz")
        (d / "qc.json").write_text(json.dumps({"image_id": i, "n": 20}))
        rows.append({"image_id": i, "collection_id": i, "status": "included"})
    pd.DataFrame(rows).to_csv(root / "qc.tsv", sep="\t", index=False)
    return root / "qc.tsv", mask_img, mask > 0


def _run(root, qc, mask_img, method):
    return run_method(method, qc, lambda i: root / "images" / str(i) / "zmap.nii.gz", mask_img,
                      {"cut_coords": [0], "threshold": 2.0}, root / "out" / method)  # fmt: skip


def test_a_t_test_of_near_identical_maps_is_flagged_and_its_peak_not_headlined(tmp_path):
    """Three maps at z = 2 +- 1e-4: the t-test's t is ~ 3e4 on 2 df, z ~ 6, above the 3.5 that
    three maps at z = 2 give together (Stouffer): an artefact of near-identical maps."""
    rng = np.random.default_rng(1)
    n_vox = int(np.prod([s - 2 for s in SHAPE]))
    base = rng.normal(size=n_vox)
    near = np.arange(n_vox) < 40
    zs = []
    for _ in range(3):
        z = base + rng.normal(size=n_vox)
        z[near] = 2.0 + 1e-4 * rng.normal(size=int(near.sum()))
        zs.append(z)
    qc, mask_img, _mask = _study(tmp_path, zs)
    summary = _run(tmp_path, qc, mask_img, "ttest")
    p = summary["plausibility"]
    assert p["ok"] is False and p["peak_ok"] is False
    assert p["n_voxels_over_bound"] >= 30 and p["k_at_peak"] == 3
    zmax = summary["z_max"]
    assert zmax > 5 and p["z_peak"] == pytest.approx(zmax)
    assert p["bound_at_peak"] == pytest.approx(np.sqrt(3) * 2.0, abs=1e-3)
    assert any("not headlined" in w for w in summary["warnings"])
    on_disk = json.loads((tmp_path / "out" / "ttest" / "summary.json").read_text())
    assert on_disk["plausibility"] == p
    # Stouffer on the same maps is at most its bound, with equality for k equal maps
    s = _run(tmp_path, qc, mask_img, "stouffer")
    assert s["plausibility"]["ok"] is True
    assert s["plausibility"]["bound_at_peak"] >= s["z_max"] * (1 - 1e-6)


@pytest.mark.parametrize("method", ["stouffer", "weighted_stouffer", "fisher", "ttest", "permutation"])
def test_z_methods_on_ordinary_maps_pass_the_check(tmp_path, method):
    rng = np.random.default_rng(2)
    n_vox = int(np.prod([s - 2 for s in SHAPE]))
    signal = np.arange(n_vox) % 3 == 0
    zs = [rng.normal(size=n_vox) + 4.0 * signal for _ in range(8)]
    qc, mask_img, _ = _study(tmp_path, zs)
    summary = _run(tmp_path, qc, mask_img, method)
    p = summary["plausibility"]
    assert p["ok"] is True and p["peak_ok"] is True and p["n_voxels_over_bound"] == 0
    assert summary["n_significant_fdr"] > 0
    zmax = np.max(np.abs(np.stack(zs)), axis=0)
    assert p["bound_at_peak"] <= np.sqrt(8) * zmax.max() * (1 + 1e-6)
