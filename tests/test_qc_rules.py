"""QC rules against planted truth: name and file filters, single-subject maps, the consensus rules."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from nvmeta.images.consensus import ConsensusSample, assess, iqr_fences
from nvmeta.images.qc import build_qc, write_qc
from nvmeta.images.record_rules import file_name, pattern_problems, record_reason
from nvmeta.testing.qc_planted import write_qc_selection
from nvmeta.workflow.config import defaults

T_SHAPE = (24, 24, 24)
T_AFF = np.array([[3.0, 0, 0, -36], [0, 3.0, 0, -36], [0, 0, 3.0, -36], [0, 0, 0, 1]])
_m = np.zeros(T_SHAPE, dtype=np.uint8)
_m[2:-2, 2:-2, 2:-2] = 1
MASK = nib.Nifti1Image(_m, T_AFF)


def image_dir_for(root):
    return lambda image_id: root / "images" / str(image_id)


@pytest.mark.parametrize(
    ("name", "file", "expected"),
    [
        ("ICA component 7", "x.nii.gz", "ica_pca"),
        ("melodic IC 3", "x.nii.gz", "ica_pca"),
        ("gPPI amygdala x faces", "x.nii.gz", "ppi"),
        ("Psychophysiological interaction", "x.nii.gz", "ppi"),
        ("Seed-based map of PCC", "x.nii.gz", "seed_connectivity"),
        ("functional_connectivity_amygdala", "x.nii.gz", "seed_connectivity"),
        ("correlation with RT", "x.nii.gz", "correlation"),
        ("sub-01 faces > houses", "x.nii.gz", "single_subject"),
        ("Subject 12: faces", "x.nii.gz", "single_subject"),
        ("faces", "cope1.nii.gz", "cope"),
        ("faces", "varcope3.nii.gz", "cope"),
        ("faces", "tfce_corrp_tstat1.nii.gz", "tfce"),
        ("faces", "melodic_IC.nii.gz", "ica_pca"),
        ("faces", "sub-07_task-faces_zstat1.nii.gz", "single_subject"),
        # whole words, not substrings (the references' substring test drops these)
        ("lexical decision > rest", "zstat1.nii.gz", None),
        ("physical pain > warmth", "TStatistic.nii.gz", None),
        ("musical > silence", "spmT_0001.nii", None),
        ("seeded words > rest", "zstat1.nii.gz", None),
        ("subgroup 2 > subgroup 1", "zstat1.nii.gz", None),
        ("coping > rest", "cope1_zstat1.nii.gz", None),  # a z statistic of a cope
    ],
)
def test_record_rules_catch_non_task_maps_by_name_and_file(name, file, expected):
    rec = {"name": name, "file": f"https://neurovault.org/media/images/9/{file}", "analysis_level": "group"}
    reason = record_reason(rec, defaults("qc"))
    if expected is None:
        assert reason is None
    else:
        block = "exclude_names" if reason.startswith("not a task contrast: name") else "exclude_files"
        assert reason.startswith(f"not a task contrast: {'name' if block == 'exclude_names' else 'file name'} "
                                 f"matches qc.{block}.{expected} (")  # fmt: skip


def test_single_subject_rule_and_switches():
    cfg = defaults("qc")
    rec = {"name": "faces", "file": "zstat1.nii.gz", "analysis_level": "group", "number_of_subjects": "1"}
    assert record_reason(rec, cfg) == "single-subject map labelled group: number_of_subjects = 1"
    assert record_reason({**rec, "analysis_level": ""}, cfg) is not None  # level missing: still caught
    assert record_reason({**rec, "analysis_level": "single-subject"}, cfg) is None  # labelled as it is
    assert record_reason({**rec, "number_of_subjects": "25"}, cfg) is None
    assert record_reason(rec, {**cfg, "exclude_single_subject": False}) is None
    ppi = {"name": "PPI amygdala", "file": "zstat1.nii.gz"}
    assert record_reason(ppi, {**cfg, "exclude_names": {**cfg["exclude_names"], "ppi": None}}) is None
    mine = {**cfg, "exclude_names": {"mine": ["^PPI"]}}
    assert record_reason(ppi, mine).startswith("not a task contrast: name matches qc.exclude_names.mine")
    assert (
        file_name("https://neurovault.org/media/images/1425/pain_01.nidm/TStatistic.nii.gz")
        == "TStatistic.nii.gz"
    )


def test_bad_pattern_stops_the_config_check():
    from helpers import REPO

    from nvmeta.errors import ConfigError
    from nvmeta.workflow.config import check_config

    assert pattern_problems(defaults("qc")) == []
    cfg = {
        "neurovault": {"url": "https://neurovault.org/api/"},
        "qc": {"exclude_files": {"mine": ["cope("]}},
        "analyses": {"a": {"image_ids": [1, 2]}},
    }
    with pytest.raises(ConfigError, match=r"config key qc\.exclude_files\.mine: 'cope\(' is not a regular"):
        check_config(cfg, REPO / "workflow" / "schemas" / "config.schema.yaml")


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    root = tmp_path_factory.mktemp("planted")
    sel, truth = write_qc_selection(root, MASK, n_good=24, seed=1, sigma_vox=2.0, noise_sigma_vox=1.0)
    return root, sel, truth


def _by_kind(qc: pd.DataFrame, truth: dict) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for row in qc.to_dict("records"):
        out.setdefault(truth[int(row["image_id"])], []).append(row)
    return out


def test_planted_selection_every_rule_catches_its_maps_and_no_good_one(planted):
    root, sel, truth = planted
    qc, funnel = build_qc(sel, image_dir_for(root), defaults("qc"), mask_img=MASK)
    kinds = _by_kind(qc, truth)
    expect = {
        "name": "not a task contrast: name matches qc.exclude_names",
        "file": "not a task contrast: file name matches qc.exclude_files",
        "single_subject": "single-subject map labelled group",
        "weak": "max |z| < 1.96",
        "huge": "max |z| > 50",
        "low_coverage": "low coverage",
        "duplicate": "duplicate of image",
        "flipped_copy": "sign-flipped copy of image",
    }
    for kind, prefix in expect.items():
        assert kinds[kind], kind
        for row in kinds[kind]:
            assert row["status"] == "excluded" and row["reason"].startswith(prefix), (kind, row["reason"])
    # flagged by default, not excluded
    for kind, text in (("inverted", "inverted contrast: r = -"), ("outlier", "outlier: r = ")):
        for row in kinds[kind]:
            assert row["status"] == "included" and text in row["flags"], (kind, row["flags"])
    for row in kinds["good"]:
        assert row["status"] == "included", row
        assert "inverted" not in row["flags"] and "outlier" not in row["flags"], row["flags"]
        assert row["consensus_r"] > 0.5
    passed = funnel.set_index("stage").loc["passed QC"]
    n_bad_flagged = len(kinds["inverted"]) + len(kinds["outlier"])
    assert passed["count"] == len(kinds["good"]) + n_bad_flagged
    assert f"{len(kinds['inverted'])} × inverted contrast" in passed["flags"]
    assert f"{len(kinds['outlier'])} × outlier" in passed["flags"]
    assert (
        f"{len(kinds['name'])} × not a task contrast: name matches qc.exclude_names" not in passed["reasons"]
    )
    assert qc.attrs["consensus"]["n_inverted"] == len(kinds["inverted"])


def test_consensus_equals_an_independent_median_and_correlation(planted):
    """Each map's r: numpy's median of the *other* maps, its 10 % tails, np.corrcoef (a direct computation)."""
    root, sel, truth = planted
    qc, _ = build_qc(sel, image_dir_for(root), defaults("qc"), mask_img=MASK)
    info = qc.attrs["consensus"]
    members = qc[(qc["status"] == "included")]
    mask = np.asarray(MASK.dataobj) > 0
    maps = np.stack(
        [
            np.asarray(nib.load(root / "images" / str(i) / "zmap.nii.gz").dataobj)[mask]
            for i in members["image_id"]
        ]
    ).astype(np.float64)
    enough = np.isfinite(maps).sum(0) >= np.ceil(len(maps) / 2)
    maps = maps[:, enough]
    assert info["n_voxels"] == int(enough.sum())
    for i, row in enumerate(members.itertuples()):
        med = np.nanmedian(np.delete(maps, i, axis=0), axis=0)
        lo, hi = np.quantile(med, [0.1, 0.9])
        sig = ((med <= lo) | (med >= hi)) & np.isfinite(maps[i])
        ref = np.corrcoef(maps[i, sig], med[sig])[0, 1]
        assert row.consensus_r == pytest.approx(ref, abs=1e-6)
    r = members["consensus_r"].to_numpy()
    good = r[r >= info["inverted_r"]]
    q1, q3 = np.percentile(good, [25, 75])
    assert info["lower_fence"] == pytest.approx(q1 - 1.5 * (q3 - q1))


@pytest.mark.parametrize("block_bytes", [64_000_000, 8 * 11 * 7])  # one block / many blocks
def test_leave_one_out_median_equals_numpy_with_ties_and_gaps(block_bytes, monkeypatch):
    import nvmeta.images.consensus as consensus
    from nvmeta.images.consensus import median_stats

    monkeypatch.setattr(consensus, "MEDIAN_BLOCK_BYTES", block_bytes)
    rng = np.random.default_rng(0)
    for k in (2, 3, 4, 5, 10, 11):
        d = rng.normal(size=(k, 500)).round(1)  # ties
        d[rng.random(d.shape) < 0.2] = np.nan
        st = median_stats(d, 2)
        np.testing.assert_allclose(st.median, np.nanmedian(d[:, st.cols], axis=0))
        for i in range(k):
            has = np.isfinite(d[i, st.cols])
            ref = np.nanmedian(np.delete(d[:, st.cols], i, axis=0)[:, has], axis=0)
            np.testing.assert_allclose(st.leave_one_out(d[i, st.cols])[has], ref)


def test_pure_noise_map_is_not_similar_to_a_sparse_consensus():
    """With sparse signal the consensus' tails are mostly noise; compared with a median it is part of,
    a noise map would correlate through its own noise. Left out, it does not."""
    rng = np.random.default_rng(1)
    v = 20_000
    pattern = np.zeros(v)
    pattern[:400] = 4.0  # 2 % of the voxels
    data = pattern + rng.normal(size=(12, v))
    data[11] = rng.normal(size=v)  # noise only
    cons = assess(data, np.ones(12, dtype=bool), inverted_r=-0.2, iqr_factor=1.5)
    assert abs(cons.r[11]) < 0.05 and cons.outlier[11]
    assert (cons.r[:11] > 0.2).all() and not cons.outlier[:11].any()


def test_exclude_options_and_subsampled_consensus(planted):
    root, sel, truth = planted
    cfg = {**defaults("qc"), "inverted": "exclude", "outliers": "exclude"}
    qc, funnel = build_qc(sel, image_dir_for(root), cfg, mask_img=MASK)
    kinds = _by_kind(qc, truth)
    for kind in ("inverted", "outlier"):
        for row in kinds[kind]:
            assert row["status"] == "excluded" and row["reason"].startswith(
                "inverted contrast" if kind == "inverted" else "outlier"
            )
    assert (pd.DataFrame(kinds["good"])["status"] == "included").all()
    reasons = funnel.set_index("stage").loc["passed QC", "reasons"]
    assert f"{len(kinds['inverted'])} × inverted contrast" in reasons
    off = build_qc(
        sel, image_dir_for(root), {**defaults("qc"), "inverted": "off", "outliers": "off"}, mask_img=MASK
    )[0]
    assert (
        off["consensus_r"].isna().all() and not off["flags"].fillna("").str.contains("outlier|inverted").any()
    )
    assert off.attrs["consensus"]["status"] == "not computed"
    # the consensus on a voxel subsample (the 20,000-map regime: 3,200 voxels) makes the same decisions
    full = build_qc(sel, image_dir_for(root), defaults("qc"), mask_img=MASK)[0]
    k = int((full["status"] == "included").sum()) + int(full["reason"].fillna("").str.contains("copy").sum())
    sub = build_qc(sel, image_dir_for(root), defaults("qc"), mask_img=MASK, consensus_bytes=4 * k * 2_000)[0]
    assert sub.attrs["consensus"]["n_voxels"] < 0.25 * full.attrs["consensus"]["n_voxels"]

    def verdicts(qc):
        return qc["flags"].fillna("").str.extract("(inverted contrast|outlier)")[0].fillna("").tolist()

    assert verdicts(sub) == verdicts(full) and verdicts(full).count("outlier") == 3
    assert np.corrcoef(sub["consensus_r"].dropna(), full["consensus_r"].dropna())[0, 1] > 0.95
    sample = ConsensusSample(3, 10_000, memory_bytes=4 * 3 * 2_500)
    assert sample.subsampled and sample.n_voxels == 2_500


def test_flipped_pair_keeps_the_map_that_agrees_with_the_consensus(tmp_path):
    sel, truth = write_qc_selection(tmp_path, MASK, n_good=12, bad={"inverted": 1}, seed=2, sigma_vox=2.0)
    s = pd.read_csv(sel, sep="\t", dtype=str, keep_default_na=False)
    inv = next(i for i, k in truth.items() if k == "inverted")
    # a later upload: the inverted map's sign-flipped copy (the contrast the other maps show)
    d = tmp_path / "images" / str(inv)
    new = tmp_path / "images" / "9999"
    new.mkdir()
    meta = json.loads((d / "metadata.json").read_text())
    (new / "metadata.json").write_text(json.dumps({**meta, "id": 9999}))
    z = nib.load(d / "map.nii.gz")
    nib.save(nib.Nifti1Image(-np.asarray(z.dataobj), z.affine), new / "map.nii.gz")
    from nvmeta.images.zmap import make_zmap

    make_zmap(
        new / "metadata.json",
        new / "map.nii.gz",
        MASK,
        {**defaults("conversion"), "df": "n-1"},
        new / "zmap.nii.gz",
        new / "qc.json",
        defaults("qc"),
    )
    row = s[s["image_id"] == str(inv)].iloc[0].to_dict()
    s = pd.concat([s, pd.DataFrame([{**row, "image_id": "9999"}])], ignore_index=True)
    s.to_csv(sel, sep="\t", index=False)
    qc, _ = build_qc(sel, image_dir_for(tmp_path), defaults("qc"), mask_img=MASK)
    q = qc.set_index("image_id")
    assert q.loc[9999, "status"] == "included" and not q.loc[9999, "flags"].count("inverted")
    assert q.loc[inv, "status"] == "excluded"
    assert q.loc[inv, "reason"].startswith("sign-flipped copy of image 9999 (r=-1.000), which agrees with")
    # order alone (the duplicate search by itself) would have kept the inverted upload
    off = build_qc(
        sel, image_dir_for(tmp_path), {**defaults("qc"), "inverted": "off", "outliers": "off"}, mask_img=MASK
    )[0]
    assert off.set_index("image_id").loc[9999, "reason"].startswith(f"sign-flipped copy of image {inv}")


def test_few_maps_no_consensus_and_the_written_json(planted, tmp_path):
    root, sel, truth = planted
    s = pd.read_csv(sel, sep="\t", dtype=str, keep_default_na=False).head(6)
    small = tmp_path / "selection.tsv"
    s.to_csv(small, sep="\t", index=False)
    out = tmp_path / "out"
    qc, _ = write_qc(small, image_dir_for(root), defaults("qc"), out / "qc.tsv", out / "funnel.tsv", mask_img=MASK,
                     consensus_json=out / "qc_consensus.json")  # fmt: skip
    info = json.loads((out / "qc_consensus.json").read_text())
    assert info["status"] == "not computed" and "< qc.consensus_min_maps = 10" in info["reason"]
    assert qc["consensus_r"].isna().all()


def test_iqr_fences_by_hand():
    q1, q3, lo, hi = iqr_fences(np.array([0.1, 0.5, 0.6, 0.7, 0.8, np.nan]), 1.5)
    assert (q1, q3) == pytest.approx((0.5, 0.7)) and (lo, hi) == pytest.approx((0.2, 1.0))
    rng = np.random.default_rng(0)
    shared = rng.normal(size=2_000)
    data = shared + 0.5 * rng.normal(size=(6, 2_000))
    data[5] = -shared + 0.5 * rng.normal(size=2_000)
    data[0, :1_000] = np.nan  # half the voxels: the median there is over the other maps
    cons = assess(data, np.ones(6, dtype=bool), inverted_r=-0.2, iqr_factor=1.5)
    assert cons.inverted.tolist() == [False] * 5 + [True]
    assert cons.info["n_voxels"] == 2_000 and cons.info["n_signal_voxels"] == 400
    few = assess(data[:, :1_100], np.ones(6, dtype=bool), inverted_r=-0.2, iqr_factor=1.5)
    assert np.isnan(few.r[0]) and few.info["n_undefined"] == 1  # ~20 of its signal voxels have data


def test_qc_figure_classes_and_files(planted, tmp_path):
    from nvmeta.figures.qc import judged_maps, plot_consensus

    root, sel, truth = planted
    out = tmp_path / "a"
    write_qc(sel, image_dir_for(root), defaults("qc"), out / "qc.tsv", out / "funnel.tsv", mask_img=MASK,
             consensus_json=out / "qc_consensus.json")  # fmt: skip
    maps = judged_maps(out / "qc.tsv")
    kinds = {int(i): k for i, k in zip(maps["image_id"], maps["kind"], strict=True)}
    assert {kinds[i] for i, t in truth.items() if t == "inverted"} == {"inverted contrast"}
    assert {kinds[i] for i, t in truth.items() if t == "outlier"} == {"outlier"}
    assert {kinds[i] for i, t in truth.items() if t == "good"} == {"kept"}
    assert not any(truth[i] in ("duplicate", "name", "weak") for i in kinds)  # not judged by the consensus
    assert maps["consensus_r"].is_monotonic_increasing
    png = plot_consensus(out / "qc.tsv", out / "qc_consensus.json", out / "qc.png", "a")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (out / "none.json").write_text(json.dumps({"status": "not computed", "reason": "3 maps < 10"}))
    assert plot_consensus(out / "qc.tsv", out / "none.json", out / "none.png").stat().st_size > 0


def test_inverted_off_leaves_anticorrelated_maps_to_the_outlier_fences(planted, tmp_path):
    from nvmeta.figures.qc import plot_consensus

    root, sel, truth = planted
    out = tmp_path / "a"
    cfg = {**defaults("qc"), "inverted": "off"}
    qc, _ = write_qc(sel, image_dir_for(root), cfg, out / "qc.tsv", out / "funnel.tsv", mask_img=MASK,
                     consensus_json=out / "qc_consensus.json")  # fmt: skip
    kinds = _by_kind(qc, truth)
    for row in kinds["inverted"]:
        assert "outlier: r = -" in row["flags"] and "inverted" not in row["flags"]
    assert json.loads((out / "qc_consensus.json").read_text())["inverted_r"] is None
    assert plot_consensus(out / "qc.tsv", out / "qc_consensus.json", out / "qc.png").exists()
