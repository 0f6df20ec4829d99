"""Inputs at scale (nvmeta.figures.plotting.input_summary / input_figures) on small planted z-maps.

References are computed independently with numpy on the stacked z-maps (np.nanmean, np.isfinite
counts, np.corrcoef on each pair's shared voxels); the workflow-level check of figures/inputs.tsv
against the demo's z-maps is in tests/test_report.py.
"""

from __future__ import annotations

import json
import struct
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from nvmeta.figures.plotting import INPUT_TABLE_COLUMNS, input_figures, input_summary
from nvmeta.workflow.config import defaults
from nvmeta.workflow.rule_inputs import path_lookup

SHAPE = (14, 16, 14)
AFFINE = np.diag([6.0, 6.0, 6.0, 1.0])
AFFINE[:3, 3] = [-42, -60, -36]


def _mask() -> np.ndarray:
    idx = np.indices(SHAPE).astype(float)
    centre = (np.array(SHAPE) - 1) / 2
    r2 = sum(((idx[d] - centre[d]) / (SHAPE[d] / 2.2)) ** 2 for d in range(3))
    return r2 <= 1.0


def _write_inputs(root: Path, n_maps: int = 7, seed: int = 0) -> dict:
    """Planted z-maps in 3 collections (ids deliberately out of collection order), one excluded image."""
    rng = np.random.default_rng(seed)
    mask = _mask()
    nib.save(nib.Nifti1Image(mask.astype(np.uint8), AFFINE), root / "mask.nii.gz")
    images = root / "images"
    shared = rng.normal(size=SHAPE)
    rows, maps = [], {}
    collections = [3, 1, 2, 1, 3, 2, 1, 2, 3, 1, 2, 3][:n_maps]
    for j in range(n_maps):
        image_id = 500 + (j * 7) % n_maps * 3 + j  # distinct, unordered
        z = (0.6 * shared + rng.normal(size=SHAPE)) * (1 + j / 3)
        if j % 3 == 1:
            z[:, :, : SHAPE[2] // 3] = np.nan  # partial coverage
        if j == 2:
            z[:4] = 0.0  # exact-zero background = no data
            z[z == 0] = np.nan
        z[~mask] = np.nan
        d = images / str(image_id)
        d.mkdir(parents=True)
        nib.save(nib.Nifti1Image(z.astype(np.float32), AFFINE), d / "zmap.nii.gz")
        (d / "qc.json").write_text(json.dumps({"image_id": image_id, "n": 10 + j, "status": "included"}))
        maps[image_id] = z.astype(np.float32)
        vals = z[mask]
        rows.append(
            {
                "image_id": image_id,
                "collection_id": collections[j],
                "name": f"map {j}",
                "contrast_definition": f"contrast {j}" if j != 4 else "",
                "status": "included",
                "reason": "",
                "coverage": float(np.isfinite(vals).mean()),
                "max_abs_z": float(np.nanmax(np.abs(vals))),
            }
        )
    # an excluded image: all-NaN z-map (as the z-map job writes), no n
    bad = 999
    d = images / str(bad)
    d.mkdir(parents=True)
    nib.save(nib.Nifti1Image(np.full(SHAPE, np.nan, np.float32), AFFINE), d / "zmap.nii.gz")
    (d / "qc.json").write_text(json.dumps({"image_id": bad, "n": None, "status": "excluded"}))
    rows.insert(
        2,
        {
            "image_id": bad,
            "collection_id": 2,
            "name": "broken",
            "contrast_definition": "x",
            "status": "excluded",
            "reason": "missing sample size",
            "coverage": np.nan,
            "max_abs_z": np.nan,
        },
    )
    pd.DataFrame(rows).to_csv(root / "qc.tsv", sep="\t", index=False)
    return {"mask": mask, "maps": maps, "rows": rows}


def _ref_corr(a: np.ndarray, b: np.ndarray) -> float:
    both = np.isfinite(a) & np.isfinite(b)
    return float(np.corrcoef(a[both], b[both])[0, 1])


def _summary(root: Path, **kw):
    return input_summary(
        root / "qc.tsv",
        lambda i: root / "images" / str(i) / "zmap.nii.gz",
        lambda i: root / "images" / str(i) / "qc.json",
        nib.load(root / "mask.nii.gz"),
        **kw,
    )


def _png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", path
    return struct.unpack(">II", head[16:24])


def test_mean_coverage_correlation_and_table_match_numpy(tmp_path):
    planted = _write_inputs(tmp_path)
    mask, maps = planted["mask"], planted["maps"]
    s = _summary(tmp_path, max_corr_maps=1000, threads=2)
    stack = np.stack([maps[i][mask] for i in sorted(maps)])
    assert s.n_maps == len(maps) == 7
    assert s.n_mask == int(mask.sum())
    np.testing.assert_array_equal(s.count, np.isfinite(stack).sum(axis=0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # voxels without data: NaN
        ref_mean = np.nanmean(stack, axis=0)
    np.testing.assert_allclose(s.mean_z, ref_mean, rtol=1e-6, atol=1e-6, equal_nan=True)
    assert ((s.count == 0) == np.isnan(s.mean_z)).all()

    # ordered by collection, then image id
    cid = {r["image_id"]: r["collection_id"] for r in planted["rows"]}
    want_order = sorted(maps, key=lambda i: (cid[i], i))
    assert s.corr_ids == want_order
    assert s.corr_collections == [cid[i] for i in want_order]
    assert s.corr_voxels == s.n_mask
    ref = np.array([[_ref_corr(maps[a][mask], maps[b][mask]) for b in want_order] for a in want_order])
    np.testing.assert_allclose(s.corr, ref, atol=1e-9)

    t = s.table
    assert list(t.columns) == INPUT_TABLE_COLUMNS
    assert t["image_id"].tolist() == [r["image_id"] for r in planted["rows"]]  # qc.tsv order
    by_id = t.set_index("image_id")
    for i, z in maps.items():
        row = by_id.loc[i]
        vals = z[mask]
        assert bool(row["included"])
        assert row["reason"] == ""
        assert row["max_abs_z"] == pytest.approx(np.nanmax(np.abs(vals)), rel=1e-6)
        assert row["coverage"] == pytest.approx(np.isfinite(vals).mean(), rel=1e-6)
        others = [_ref_corr(vals, maps[o][mask]) for o in maps if o != i]
        assert row["mean_r"] == pytest.approx(np.mean(others), abs=1e-9)
        assert row["n"] == json.loads((tmp_path / "images" / str(i) / "qc.json").read_text())["n"]
    # contrast: the contrast definition, else the name
    j4 = planted["rows"][5]  # j == 4 (after the inserted bad row)
    assert j4["contrast_definition"] == "" and by_id.loc[j4["image_id"], "contrast"] == j4["name"]
    bad = by_id.loc[999]
    assert not bad["included"] and bad["reason"] == "missing sample size"
    assert pd.isna(bad["n"]) and pd.isna(bad["mean_r"]) and pd.isna(bad["max_abs_z"])


def test_correlation_matrix_is_capped_and_voxels_subsampled(tmp_path):
    planted = _write_inputs(tmp_path, n_maps=12, seed=1)
    mask, maps = planted["mask"], planted["maps"]
    s = _summary(tmp_path, max_corr_maps=4, value_budget=4 * 1000)
    cid = {r["image_id"]: r["collection_id"] for r in planted["rows"]}
    order = sorted(maps, key=lambda i: (cid[i], i))
    # 4 maps spread over the collection-ordered list: first and last included
    assert len(s.corr_ids) == 4 and s.corr_ids[0] == order[0] and s.corr_ids[-1] == order[-1]
    assert s.corr_ids == sorted(s.corr_ids, key=order.index)
    # the mean and coverage still use every map and voxel
    assert s.n_maps == 12
    np.testing.assert_array_equal(s.count, np.isfinite(np.stack([maps[i][mask] for i in maps])).sum(axis=0))
    # 1000 evenly spaced mask voxels
    assert s.corr_voxels == 1000 < s.n_mask
    vox = np.unique(np.linspace(0, s.n_mask - 1, 1000).round().astype(int))
    ref = np.array(
        [[_ref_corr(maps[a][mask][vox], maps[b][mask][vox]) for b in s.corr_ids] for a in s.corr_ids]
    )
    np.testing.assert_allclose(s.corr, ref, atol=1e-9)
    # mean_r only for the maps in the matrix
    t = s.table.set_index("image_id")
    assert t.loc[s.corr_ids, "mean_r"].notna().all()
    assert t.loc[[i for i in maps if i not in s.corr_ids], "mean_r"].isna().all()


@pytest.mark.parametrize("cap", [50, 3])
def test_input_figures_write_every_file(tmp_path, cap):
    _write_inputs(tmp_path)
    out = {
        "table": tmp_path / "fig" / "inputs.tsv",
        "mean_z": tmp_path / "fig" / "inputs_mean_z.png",
        "coverage": tmp_path / "fig" / "inputs_coverage.png",
        "correlation": tmp_path / "fig" / "inputs_correlation.png",
        "glass": tmp_path / "fig" / "inputs_glass_brain.png",
    }
    cfg = {**defaults("figures"), "glass_brain_max_maps": cap}
    images = tmp_path / "images"
    zmaps = path_lookup(sorted(images.glob("*/zmap.nii.gz")), "zmaps")
    qcs = path_lookup(sorted(images.glob("*/qc.json")), "qcjson")
    s = input_figures(tmp_path / "qc.tsv", zmaps, qcs, tmp_path / "mask.nii.gz", out, cfg, "toy")
    table = pd.read_csv(out["table"], sep="\t", keep_default_na=False, na_values=[""])
    assert list(table.columns) == INPUT_TABLE_COLUMNS and len(table) == 8
    assert table["included"].tolist() == s.table["included"].tolist()
    for key in ("mean_z", "coverage", "correlation"):
        w, h = _png_size(out[key])
        assert w > 300 and h > 100, key
    # no temporary left next to the outputs
    assert sorted(p.name for p in out["table"].parent.iterdir()) == sorted(p.name for p in out.values())
    w, h = _png_size(out["glass"])
    assert w > 300
    if cap == 3:  # 7 maps > 3: a one-line notice instead of 7 glass brains
        assert h < 400
    else:
        assert h > 400  # 7 panels in rows


def test_figures_block_defaults_are_in_the_schema():
    d = defaults("figures")
    assert d == {"glass_brain_max_maps": 50, "correlation_max_maps": 1000}


def test_one_map_has_no_correlation_matrix_and_figures_keep_their_size(tmp_path):
    """With 1 included map there is no pair to correlate: the figure says so (a 1 × 1 "matrix" said
    nothing). Under NiMARE's rcParams (savefig.bbox: tight) every figure keeps its designed size."""
    import matplotlib

    _write_inputs(tmp_path, n_maps=1)
    out = {k: tmp_path / "fig" / f"inputs_{k}.png" for k in ("mean_z", "coverage", "correlation", "glass")}
    out["table"] = tmp_path / "fig" / "inputs.tsv"
    images = tmp_path / "images"
    zmaps = path_lookup(sorted(images.glob("*/zmap.nii.gz")), "zmaps")
    qcs = path_lookup(sorted(images.glob("*/qc.json")), "qcjson")
    with matplotlib.rc_context({"savefig.bbox": "tight"}):
        s = input_figures(tmp_path / "qc.tsv", zmaps, qcs, tmp_path / "mask.nii.gz", out, defaults("figures"), "toy",
                          cut_coords=[-10, 0, 10])  # fmt: skip
    assert s.n_maps == 1 and len(s.corr_ids) == 1
    assert _png_size(out["correlation"]) == (900, 200)  # the message figure, not a matrix
    assert _png_size(out["mean_z"]) == _png_size(out["coverage"]) == (1400, 340)


def test_glass_items_give_name_and_contrast(tmp_path):
    from nvmeta.figures.plotting import glass_items

    pd.DataFrame(
        [
            dict(
                image_id=3, status="included", contrast_definition="pain vs rest", name="pain_01: T statistic"
            ),
            dict(image_id=1, status="excluded", contrast_definition="x", name="b"),
            dict(image_id=2, status="included", contrast_definition="map two", name="map two"),
            dict(image_id=5, status="included", contrast_definition=None, name=None),
        ]
    ).to_csv(tmp_path / "qc.tsv", sep="\t", index=False)
    items = glass_items(tmp_path / "qc.tsv", lambda i: tmp_path / f"{i}.nii.gz")
    assert items == [
        (3, "pain_01: T statistic — pain vs rest", tmp_path / "3.nii.gz"),
        (2, "map two", tmp_path / "2.nii.gz"),
        (5, "", tmp_path / "5.nii.gz"),
    ]
