"""Per-analysis QC table and funnel: rules applied, duplicates and sign flips, funnel counts."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from nvmeta.images.qc import QC_COLUMNS, _pairwise_r, build_qc, find_duplicates, write_qc
from nvmeta.images.zmap import make_zmap
from nvmeta.select.query import SELECTION_COLUMNS
from nvmeta.workflow.config import defaults

T_SHAPE = (20, 20, 20)
T_AFF = np.array([[2.0, 0, 0, -20], [0, 2.0, 0, -20], [0, 0, 2.0, -20], [0, 0, 0, 1]])
_m = np.zeros(T_SHAPE, dtype=np.uint8)
_m[2:-2, 2:-2, 2:-2] = 1
MASK = nib.Nifti1Image(_m, T_AFF)

SEL_COLS = list(SELECTION_COLUMNS)


def smooth_field(seed: int) -> np.ndarray:
    """A smooth random z-like field with max |z| around 4-6."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=T_SHAPE)
    from scipy.ndimage import gaussian_filter

    x = gaussian_filter(x, 2.0)
    return (x / x.std() * 1.8).astype(np.float32)


def add_image(root: Path, image_id: int, data, map_type="Z map", n=20, status="ok", reason=None, cid=5):
    d = root / "images" / str(image_id)
    d.mkdir(parents=True)
    rec = {
        "id": image_id,
        "collection_id": cid,
        "map_type": map_type,
        "number_of_subjects": n,
        "statistic_parameters": None,
        "name": f"img {image_id}",
        "nvmeta": {"status": status, "reason": reason},
    }
    (d / "metadata.json").write_text(json.dumps(rec))
    if status == "ok":
        nib.save(nib.Nifti1Image(np.asarray(data, dtype=np.float32), T_AFF), d / "map.nii.gz")
    make_zmap(
        d / "metadata.json",
        d / "map.nii.gz",
        MASK,
        {**defaults("conversion"), "df": "n-2"},
        d / "zmap.nii.gz",
        d / "qc.json",
        defaults("qc"),
    )
    return rec


@pytest.fixture
def analysis(tmp_path):
    base = smooth_field(0)
    other = smooth_field(1)
    rng = np.random.default_rng(3)
    low_cov = smooth_field(2)
    low_cov[:, :, 8:] = np.nan  # ~30 % of the mask
    weak = smooth_field(4) / 4  # max |z| < 1.96
    huge = smooth_field(5)
    huge[10, 10, 10] = 80.0
    noisy = base + rng.normal(scale=0.35, size=T_SHAPE).astype(np.float32)  # r ~ 0.95: kept
    partial_dup = base.copy()
    partial_dup[:, :10, :] = np.nan  # same map, less coverage: still a duplicate on shared voxels
    images = [
        (101, base, {}),
        (102, None, {"status": "failed", "reason": "HTTP 404 not found"}),
        (103, other, {"map_type": "F map"}),
        (104, base * 2.5, {"map_type": "T map", "n": 0}),  # NIDM: missing sample size
        (105, low_cov, {}),
        (106, weak, {}),
        (107, huge, {}),
        (108, -base, {}),  # sign-flipped copy of 101
        (109, base * 1.0001, {}),  # duplicate of 101
        (110, noisy, {}),
        (111, other, {"map_type": "T map", "n": 30}),
        (112, partial_dup, {}),
        (113, None, {"status": "failed", "reason": "HTTP 403 private collection"}),
    ]
    rows = []
    for image_id, data, kw in images:
        add_image(tmp_path, image_id, data, **kw)
        rows.append(
            {
                "image_id": image_id,
                "collection_id": 5,
                "name": f"img {image_id}",
                "map_type": kw.get("map_type", "Z map"),
                "number_of_subjects": "" if kw.get("n", 20) is None else kw.get("n", 20),
                "contrast_definition": "pain > rest" if image_id == 101 else "",
            }
        )
    sel = pd.DataFrame(rows).reindex(columns=SEL_COLS)
    sel_path = tmp_path / "analyses" / "a" / "selection.tsv"
    sel_path.parent.mkdir(parents=True)
    sel.to_csv(sel_path, sep="\t", index=False)
    return tmp_path, sel_path


def image_dir_for(root: Path):
    return lambda image_id: root / "images" / str(image_id)


EXPECTED = {
    101: ("included", None),
    102: ("excluded", "download failed: HTTP 404 not found"),
    103: ("excluded", "map type not usable: F map"),
    104: ("excluded", "missing sample size"),
    105: ("excluded", "low coverage: 0.375 < 0.4"),
    106: ("excluded", "max |z| < 1.96 (probably not a t/z map)"),
    107: ("excluded", "max |z| > 50"),
    108: ("excluded", "sign-flipped copy of image 101 (r=-1.000)"),
    109: ("excluded", "duplicate of image 101 (r=1.000)"),
    110: ("included", None),
    111: ("included", None),
    112: ("excluded", "duplicate of image 101 (r=1.000)"),
    113: ("excluded", "download failed: HTTP 403 private collection"),
}


@pytest.mark.parametrize("memory_bytes", [2_000_000_000, 1])  # exact pairwise / subsample screening
def test_qc_table_rules_and_reasons(analysis, memory_bytes, caplog):
    root, sel = analysis
    caplog.set_level("INFO", logger="nvmeta.images.qc")
    qc, funnel = build_qc(sel, image_dir_for(root), defaults("qc"), memory_bytes=memory_bytes)
    assert list(qc.columns) == QC_COLUMNS
    assert qc["image_id"].tolist() == list(EXPECTED)  # selection order, one row per image
    got = {int(r.image_id): (r.status, None if pd.isna(r.reason) else r.reason) for r in qc.itertuples()}
    assert got == EXPECTED
    row = qc.set_index("image_id").loc[101]
    assert row["contrast_definition"] == "pain > rest" and row["number_of_subjects"] == 20
    assert row["df_source"] == "z map" and row["coverage"] == 1.0
    assert row["max_abs_z"] > 1.96
    t_row = qc.set_index("image_id").loc[111]
    assert (t_row["df"], t_row["df_source"]) == (28.0, "n-2")
    assert "df assumed from sample size (n-2)" in t_row["flags"]
    assert any("duplicate search" in r.getMessage() and r.name == "nvmeta.images.qc" for r in caplog.records)


def test_funnel_counts(analysis):
    root, sel = analysis
    _, funnel = build_qc(sel, image_dir_for(root), {**defaults("qc"), "min_coverage": 0.5})
    f = funnel.set_index("stage")
    assert list(funnel.columns) == ["stage", "count", "excluded_here", "reasons", "flagged", "flags"]
    assert f.index.tolist() == ["selected", "downloaded", "converted", "passed QC"]
    assert f["count"].tolist() == [13, 11, 9, 3]
    assert f["excluded_here"].tolist() == [0, 2, 2, 6]
    assert f.loc["downloaded", "reasons"] == (
        "1 × download failed: HTTP 403 private collection; 1 × download failed: HTTP 404 not found"
    )
    assert f.loc["converted", "reasons"] == "1 × map type not usable: F map; 1 × missing sample size"
    assert f.loc["passed QC", "reasons"] == (
        "2 × duplicate of image; 1 × low coverage; 1 × max |z| < 1.96 (probably not a t/z map); "
        "1 × max |z| > 50; 1 × sign-flipped copy of image"
    )


def test_configurable_rules(analysis):
    root, sel = analysis
    cfg = {
        **defaults("qc"),
        "min_coverage": 0.2,
        "min_max_abs_z": 0.5,
        "max_abs_z": 100,
        "duplicate_r": 0.999999,
    }
    qc, funnel = build_qc(sel, image_dir_for(root), cfg)
    st = dict(zip(qc["image_id"], qc["status"], strict=True))
    assert st[105] == st[106] == st[107] == "included"
    # 1.0001 * base and -base are still |r| = 1 up to float32; the noisy copy is not
    assert st[108] == st[109] == "excluded" and st[110] == "included"
    assert int(funnel.set_index("stage").loc["passed QC", "count"]) == 6  # 101, 105, 106, 107, 110, 111


def test_write_qc_and_flags(analysis):
    root, sel = analysis
    out = root / "analyses" / "a"
    qc, funnel = write_qc(
        sel, image_dir_for(root), defaults("qc"), out / "qc.tsv", out / "funnel.tsv", mask_img=MASK
    )
    back = pd.read_csv(out / "qc.tsv", sep="\t")
    assert back["image_id"].tolist() == qc["image_id"].tolist()
    assert list(back.columns) == QC_COLUMNS
    assert pd.read_csv(out / "funnel.tsv", sep="\t")["count"].tolist() == [13, 11, 9, 3]
    # excluded rows have no flags; the weak noisy copy carries none
    assert back.loc[back.status == "excluded", "flags"].isna().all()


def test_pairwise_r_matches_numpy_on_shared_voxels():
    rng = np.random.default_rng(7)
    a = rng.normal(size=(5, 400)).astype(np.float32)
    b = rng.normal(size=(4, 400)).astype(np.float32)
    b[1] = 0.7 * a[2] + 0.3 * b[1]
    a[rng.random(a.shape) < 0.2] = np.nan
    b[rng.random(b.shape) < 0.3] = np.nan
    r, n = _pairwise_r(a, b)
    for i in range(5):
        for j in range(4):
            ok = np.isfinite(a[i]) & np.isfinite(b[j])
            assert n[i, j] == ok.sum()
            assert r[i, j] == pytest.approx(np.corrcoef(a[i, ok], b[j, ok])[0, 1], abs=1e-5)


@pytest.mark.parametrize("memory_bytes", [10**9, 1])
def test_find_duplicates_keeps_first_and_chunks(memory_bytes):
    rng = np.random.default_rng(11)
    k, v = 40, 3000
    maps = rng.normal(size=(k, v)).astype(np.float32)
    maps[rng.random(maps.shape) < 0.1] = np.nan
    maps[17] = maps[3] * 2 + 1  # duplicate (affine copy) of 3
    maps[25] = -maps[3]  # sign flip of 3
    maps[33] = maps[20] + rng.normal(scale=0.01, size=v).astype(np.float32)  # near duplicate of 20
    maps[34] = maps[33]  # duplicate of 20 too (33 is excluded, so 34 points to the kept 20)
    maps[35, :1500] = np.nan
    maps[35, 1500:] = maps[8, 1500:]  # duplicate of 8 on the shared half
    calls: list[int] = []

    def load(i: int) -> np.ndarray:
        calls.append(i)
        return maps[i].copy()

    dups = find_duplicates(load, k, 0.99, memory_bytes=memory_bytes, chunk=7, screen_voxels=500)
    assert {j: i for j, (i, _) in dups.items()} == {17: 3, 25: 3, 33: 20, 34: 20, 35: 8}
    assert dups[25][1] == pytest.approx(-1.0, abs=1e-5) and dups[17][1] == pytest.approx(1.0, abs=1e-5)
    if memory_bytes > 1:
        assert sorted(calls) == list(range(k))  # every map read exactly once
    else:
        assert len(calls) < 2 * k  # one pass + the few candidate pairs


def test_too_few_shared_voxels_are_not_duplicates():
    a = np.full(1000, np.nan, dtype=np.float32)
    b = np.full(1000, np.nan, dtype=np.float32)
    a[:550] = np.arange(550)
    b[500:] = np.arange(500)
    assert find_duplicates(lambda i: (a, b)[i].copy(), 2, 0.99) == {}  # 50 shared voxels < 100


def test_empty_selection(tmp_path):
    sel = tmp_path / "selection.tsv"
    sel.write_text("\t".join(SEL_COLS) + "\n")
    qc, funnel = build_qc(sel, image_dir_for(tmp_path), defaults("qc"))
    assert qc.empty and list(qc.columns) == QC_COLUMNS
    assert funnel["count"].tolist() == [0, 0, 0, 0]


def test_qc_table_reads_the_resolved_n_from_qc_json(tmp_path):
    # the record says n = 0 (NIDM); conversion.n_images gives 20: the QC table shows 20, like qc.json
    d = tmp_path / "images" / "201"
    d.mkdir(parents=True)
    rec = {
        "id": 201,
        "collection_id": 5,
        "map_type": "T map",
        "number_of_subjects": 0,
        "statistic_parameters": None,
        "nvmeta": {"status": "ok", "reason": None},
    }
    (d / "metadata.json").write_text(json.dumps(rec))
    nib.save(nib.Nifti1Image(smooth_field(7) * 2, T_AFF), d / "map.nii.gz")
    conv = {"df": "n-2", "n_images": {"201": 20}}
    qc = make_zmap(
        d / "metadata.json",
        d / "map.nii.gz",
        MASK,
        {**defaults("conversion"), **conv},
        d / "zmap.nii.gz",
        d / "qc.json",
        defaults("qc"),
    )
    assert (qc["n"], qc["df"]) == (20, 18.0)
    sel = pd.DataFrame([{"image_id": 201, "collection_id": 5, "number_of_subjects": 0}]).reindex(
        columns=SEL_COLS
    )
    sel_path = tmp_path / "selection.tsv"
    sel.to_csv(sel_path, sep="\t", index=False)
    qc_df, _ = build_qc(sel_path, image_dir_for(tmp_path), defaults("qc"), mask_img=MASK)
    row = qc_df.iloc[0]
    assert row["status"] == "included"
    assert row["n"] == 20 and row["n_source"] == "n_images" and row["df"] == 18.0
    assert row["number_of_subjects"] == 0  # the record's value, as recorded
    assert "n from config (n_images)" in row["flags"]


def test_funnel_groups_the_new_per_image_reasons():
    from nvmeta.images.qc import reason_key

    assert reason_key("implausible sample size: number_of_subjects = 20.5 is not an integer (set ...)") == (
        "implausible sample size"
    )
    assert (
        reason_key("implausible effect size: max |t| / sqrt(n) = 2.27e+03 > ...") == "implausible effect size"
    )
    assert reason_key("implausible degrees of freedom: statistic_parameters = 1e+300 > ...") == (
        "implausible degrees of freedom"
    )
    assert reason_key("map too large: header says 400x400x400 voxels = 256 MB ...") == "map too large"


def test_screened_search_equals_exact_search_above_64_maps():
    # > 64 maps: screening on a voxel subsample + exact check; same decisions as all pairs exactly
    rng = np.random.default_rng(5)
    k, v = 90, 30_000
    from scipy.ndimage import gaussian_filter1d

    maps = gaussian_filter1d(rng.normal(size=(k, v)), 3, axis=1).astype(np.float32)
    maps[:, : v // 10] = np.nan
    maps[rng.random(maps.shape) < 0.05] = np.nan
    maps[70] = maps[12] * 3 - 1  # affine copy
    maps[71] = -maps[40]  # sign flip
    maps[72] = maps[2] + gaussian_filter1d(rng.normal(scale=0.02, size=v), 3).astype(np.float32)  # near copy
    maps[73, : v // 2] = np.nan
    maps[73, v // 2 :] = maps[30, v // 2 :]  # duplicate on the shared half only
    maps[74] = 0.9 * maps[5] + 0.45 * maps[6]  # r ~ 0.9: not a duplicate
    calls: list[int] = []

    def load(i: int) -> np.ndarray:
        calls.append(i)
        return maps[i].copy()

    screened = find_duplicates(load, k)
    assert sorted(calls) == list(range(k))  # held in memory: every map read once
    exact = find_duplicates(lambda i: maps[i].copy(), k, exact_max_maps=k)
    assert {j: i for j, (i, _) in screened.items()} == {70: 12, 71: 40, 72: 2, 73: 30}
    assert screened.keys() == exact.keys()
    for j in screened:
        assert screened[j][0] == exact[j][0]
        assert screened[j][1] == pytest.approx(exact[j][1], abs=1e-5)


def test_qc_rule_memory_follows_the_duplicate_search_not_the_number_of_maps():
    """The QC job holds every map only up to the duplicate search's budget (then a 2,000-voxel
    subsample): its declared mem_mb covers the held maps (planted: k maps x mask voxels x 4 bytes
    on the MNI 2 mm mask, plus the 0.35 GB the job measured without them) and stays a few GB at
    20,000 maps, where one float32 copy per map (the old 1000 + 2n = 41 GB) would make the job
    unschedulable on most nodes (measured: 5,000 maps peaked at 0.36 GB)."""
    import re

    from helpers import REPO

    from nvmeta.images.consensus import CONSENSUS_BYTES
    from nvmeta.images.qc import DUPLICATE_SEARCH_BYTES

    smk = (REPO / "workflow" / "rules" / "qc.smk").read_text()
    expr = re.search(r"mem_mb=(lambda wildcards, input:.*?),\n\s+runtime=", smk, re.S).group(1)
    names = {"DUPLICATE_SEARCH_BYTES": DUPLICATE_SEARCH_BYTES, "CONSENSUS_BYTES": CONSENSUS_BYTES}
    mem_mb = eval("(" + expr + ")", names)

    def declared(n: int) -> int:
        return mem_mb(None, type("Input", (), {"zmaps": [None] * n}))

    voxels = 235_375
    held_max = DUPLICATE_SEARCH_BYTES // (voxels * 4)  # the most maps the search holds
    for k in (2, 100, 1000, held_max):
        # the held maps and the consensus' subsample of them (nvmeta.images.consensus)
        consensus = min(k * voxels * 4, CONSENSUS_BYTES) / 2**20
        assert declared(k) >= 350 + k * voxels * 4 / 2**20 + consensus, k
    assert declared(20_000) <= 4_000
    assert declared(5_000) >= 360
