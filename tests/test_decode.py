"""Decoding against a task atlas built from NeuroVault itself (nvmeta.decode).

A synthetic NeuroVault (nvmeta.testing.tasks): tasks with their own planted spatial signatures, each
in several collections, every map also carrying one pattern all maps share, plus smooth noise.
References: the planted truth (which task a held-out map is), nvmeta's in-memory meta-analysis
estimators (nvmeta.meta.estimators.combine) for the leave-out references, numpy's corrcoef for r,
scipy's KS test for the null's p-values; the workflow's job list for the rerun.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from helpers import selection as query_selection

from nvmeta.decode.decoding import decode_analysis
from nvmeta.decode.null import Pool, load_pool, pairwise_r, sample_references
from nvmeta.decode.references import read_references, write_references
from nvmeta.decode.sums import min_count
from nvmeta.decode.terms import SLUG, clean_term, read_members, slug
from nvmeta.errors import ConfigError
from nvmeta.meta.estimators import combine
from nvmeta.testing.tasks import make_task_maps, run_atlas_stages, small_mask, task_names, write_zmaps
from nvmeta.workflow.config import defaults

LOG = logging.getLogger("test_decode")
FIELD_BYTES = defaults("neurovault")["max_dump_field_bytes"]
TASKS = task_names(4)


def atlas_cfg(**kw):
    return {**defaults("atlas"), "min_maps": 3, "min_collections": 2, "null_voxels": 1500, **kw}


def decode_cfg(**kw):
    return {**defaults("decode"), **kw}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """4 tasks x 3 collections x 4 maps in the atlas (every 3rd map misses the bottom of the mask),
    and 2 held-out maps per task in collections of their own."""
    root = tmp_path_factory.mktemp("decode")
    mask = small_mask()
    atlas_maps = make_task_maps(mask, TASKS, 3, 4, seed=1, partial_every=3)
    held = make_task_maps(
        mask, TASKS, 1, 2, seed=2, first_id=20001, first_cid=901, signatures_from=atlas_maps
    )
    zmaps = write_zmaps(root, atlas_maps)
    zmaps.update(write_zmaps(root, held))
    atlas = atlas_cfg()
    adir = run_atlas_stages(root, atlas_maps, zmaps, atlas, LOG)
    return {"root": root, "mask": mask, "atlas_maps": atlas_maps, "held": held, "zmaps": zmaps, "atlas": atlas,
            "dir": adir, "members": read_members(adir / "members.tsv")}  # fmt: skip


def selection(path: Path, maps) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame([{"image_id": m.image_id, "collection_id": m.collection_id} for m in maps]).to_csv(
        path, sep="\t", index=False
    )
    return path


def references(world, analysis: str, maps, leave_out="collections", atlas=None, adir=None):
    adir = adir or world["dir"]
    a = world["root"] / "analyses" / analysis
    sel = selection(a / "selection.tsv", maps)
    members = read_members(adir / "members.tsv")
    write_references(sel, adir / "atlas.tsv", members, lambda s: adir / s / "z.nii.gz",
                     lambda s: adir / s / "sums.npz", world["zmaps"].__getitem__, world["mask"],
                     atlas or world["atlas"], leave_out, a / "decode/references.tsv", a / "decode/references",
                     LOG)  # fmt: skip
    return a, read_references(a / "decode/references.tsv")


def decode(world, a: Path, sources, **kw):
    adir = world["dir"]
    samples = [adir / s / "sample.npz" for s in world["members"]]
    return decode_analysis(sources, a / "decode/references.tsv", a / "selection.tsv", samples, world["mask"],
                           world["atlas"], decode_cfg(**kw), a / "decode/decoding.tsv", a / "decode/decoding.png",
                           a / "decode/summary.json", LOG)  # fmt: skip


def vec(path, mask_img) -> np.ndarray:
    data = np.asarray(nib.load(path).dataobj, dtype=np.float64)
    return data[np.asarray(mask_img.dataobj) > 0]


# ------------------------------------------------------------------------------------------- terms


def test_term_slugs_are_safe_distinct_and_stable():
    names = ["pain monitor/discrimination task", "../../etc/passwd", "n-back task", "n back task",
             "Ünïcode tâsk 日本", "x" * 300, "___", "a\\b:c*d?e"]  # fmt: skip
    slugs = [slug(n) for n in names]
    assert len(set(slugs)) == len(names)
    for n, s in zip(names, slugs, strict=True):
        assert SLUG.fullmatch(s) and re.fullmatch(r"[a-z0-9_]{1,49}", s), s
        assert s == slug(n)  # stable
    assert slugs[0] == "pain_monitor_discrimination_task_" + slugs[0][-8:]
    assert slugs[6].startswith("term_")
    assert (
        clean_term("  n-back\ttask \n") == "n-back task"
        and clean_term("  ") is None
        and clean_term(None) is None
    )


def test_terms_below_min_maps_or_collections_get_no_reference(world):
    terms = pd.read_csv(world["dir"] / "terms.tsv", sep="\t")
    assert sorted(terms["term"]) == sorted(TASKS) and terms["eligible"].all()
    assert (terms["n_maps"] == 12).all() and (terms["n_collections"] == 3).all()
    from nvmeta.decode.terms import write_terms

    d = world["root"] / "strict"
    d.mkdir(exist_ok=True)
    t, m = write_terms(
        world["dir"] / "groups.tsv", world["dir"] / "qc.tsv", 12, 4, d / "terms.tsv", d / "members.tsv"
    )
    assert not t["eligible"].any() and len(m) == 0
    assert "needs atlas.min_maps=12 and atlas.min_collections=4" in t["reason"].iloc[0]


# ------------------------------------------------------------------------------------- leave-out


@pytest.mark.parametrize("method", ["stouffer", "weighted_stouffer", "fisher", "ttest"])
@pytest.mark.parametrize("leave_out", ["collections", "images"])
def test_leave_out_reference_is_the_reference_of_the_remaining_maps(world, tmp_path, method, leave_out):
    """The leave-out reference (stored sums minus the maps left out) equals the same estimator run
    from scratch on the remaining maps (nvmeta.meta.estimators.combine), voxel for voxel, and n_maps
    counts exactly the maps left."""
    atlas = atlas_cfg(method=method, min_fraction=0.8)  # the partial maps leave voxels below it
    ts = world["atlas_maps"]
    adir = run_atlas_stages(tmp_path, ts, world["zmaps"], atlas, LOG)
    task = TASKS[1]
    of_task = [m for m in ts.maps if m.task == task]
    # the analysis: 2 maps of the task's first collection and one map of another task
    other = next(m for m in ts.maps if m.task == TASKS[2])
    picked = of_task[:2] + [other]
    a, refs = references({**world, "root": tmp_path}, "probe", picked, leave_out, atlas, adir)
    out_ids = {m.image_id for m in picked}
    out_cids = {m.collection_id for m in picked} if leave_out == "collections" else set()
    for t in TASKS:
        row = refs[refs["term"] == t].iloc[0]
        keep = [
            m
            for m in ts.maps
            if m.task == t and m.image_id not in out_ids and m.collection_id not in out_cids
        ]
        assert row["n_maps"] == len(keep), t
        assert row["n_collections"] == len({m.collection_id for m in keep})
        assert row["n_left_out"] == 12 - len(keep)
        got = vec(row["map"], world["mask"])
        if len(keep) == 12:
            assert row["map"] == str(adir / slug(t) / "z.nii.gz")  # untouched: the atlas' own map
        else:
            assert Path(row["map"]).parent == a / "decode/references"
        z, _, k = combine(method, np.vstack([m.z for m in keep]), n=np.array([m.n for m in keep], float))
        z[k < min_count(method, len(keep), atlas["min_fraction"])] = np.nan
        np.testing.assert_array_equal(np.isnan(got), np.isnan(z))
        np.testing.assert_allclose(got[~np.isnan(z)], z[~np.isnan(z)], rtol=2e-6, atol=2e-6)
    assert (np.isnan(got)).any(), "the partial-coverage maps should leave voxels below min_fraction"


def test_a_term_left_with_too_few_maps_is_not_decodable(world):
    ts = world["atlas_maps"]
    task = TASKS[0]
    # two of the task's three collections: 4 maps from 1 collection left (min_collections 2)
    picked = [m for m in ts.maps if m.task == task][:8:4]
    _, refs = references(world, "few", picked)
    row = refs[refs["term"] == task].iloc[0]
    assert not row["decodable"] and row["map"] == "" and row["n_maps"] == 4 and row["n_collections"] == 1
    assert "needs atlas.min_maps=3 and atlas.min_collections=2" in row["reason"]


# ---------------------------------------------------------------------------------------- decoding


def test_held_out_maps_decode_to_their_task_first(world):
    held = world["held"]
    a, _ = references(world, "held", held.maps)
    sources = [(f"map/{m.image_id}", world["zmaps"][m.image_id]) for m in held.maps]
    df = decode(world, a, sources, n_null=199)
    assert len(df) == len(sources) * len(TASKS)
    for m in held.maps:
        part = df[df["source"] == f"map/{m.image_id}"].sort_values("rank")
        assert part["term"].iloc[0] == m.task, part[["term", "r", "p_null"]]
        assert part["rank"].tolist() == [1, 2, 3, 4]
        assert part["p_null"].iloc[0] <= 0.02 and (part["n_null"] == 199).all()
        # held-out maps are in no atlas collection: every reference keeps its 12 maps
        assert (part["n_maps"] == 12).all()
    summary = json.loads((a / "decode/summary.json").read_text())
    assert summary["pool_maps"] == 48 and summary["n_decodable"] == 4
    from nvmeta.decode.decoding import describe_decoding

    lines = describe_decoding(a / "decode/decoding.tsv")
    first = held.maps[0]
    assert len(lines) == len(sources) and lines[0].startswith(
        f"map/{first.image_id} resembles {first.task} (r = "
    )
    assert (a / "decode/decoding.png").stat().st_size > 10_000


def test_r_is_pearson_over_the_common_mask(world):
    """r (NiMARE's CorrelationDecoder) is numpy's corrcoef over the voxels where the source and
    every reference have data; a source with a hole has a smaller common mask."""
    held = world["held"]
    a, refs = references(world, "pearson", held.maps[:1])
    src = held.maps[0].z.astype(np.float64).copy()
    src[:400] = np.nan
    path = world["root"] / "hole.nii.gz"
    mask = np.asarray(world["mask"].dataobj) > 0
    vol = np.full(mask.shape, np.nan, np.float32)
    vol[mask] = src
    nib.save(nib.Nifti1Image(vol, world["mask"].affine), path)
    df = decode(world, a, [("hole", path)], n_null=19)
    ref_vecs = {r.term: vec(r.map, world["mask"]) for r in refs.itertuples()}
    common = np.isfinite(src) & np.logical_and.reduce([np.isfinite(v) for v in ref_vecs.values()])
    assert (df["n_voxels"] == common.sum()).all() and common.sum() < mask.sum() - 400 + 1
    for row in df.itertuples():
        want = np.corrcoef(src[common], ref_vecs[row.term][common])[0, 1]
        assert row.r == pytest.approx(want, abs=1e-6)


def test_the_null_gives_uniform_p_for_pure_noise(world):
    """White-noise maps resemble no task: their empirical p-values are uniform (KS test), for every
    term, and the null's own spread matches the observed one's."""
    from scipy import stats

    rng = np.random.default_rng(11)
    mask = np.asarray(world["mask"].dataobj) > 0
    a, _ = references(world, "noise", world["held"].maps[:0])
    sources = []
    for k in range(80):
        vol = np.full(mask.shape, np.nan, np.float32)
        vol[mask] = rng.standard_normal(int(mask.sum()))
        path = world["root"] / f"noise_{k}.nii.gz"
        nib.save(nib.Nifti1Image(vol, world["mask"].affine), path)
        sources.append((f"noise/{k}", path))
    df = decode(world, a, sources, n_null=99)
    p = df["p_null"].to_numpy(float)
    assert p.size == 80 * len(TASKS) and np.isfinite(p).all()
    assert stats.kstest(p, "uniform").pvalue > 0.01
    assert abs(p.mean() - 0.5) < 0.05
    for term in TASKS:  # per term too
        assert stats.kstest(df.loc[df["term"] == term, "p_null"], "uniform").pvalue > 0.001


def test_null_references_are_built_as_a_terms_reference(world):
    """A null reference from a draw equals the term reference of the same maps (on the voxel
    sample), and the pool leaves the analysis' maps out."""
    samples = [world["dir"] / s / "sample.npz" for s in world["members"]]
    ts = world["atlas_maps"]
    out = {m.image_id for m in ts.maps[:4]}
    pool = load_pool(samples, out, set())
    assert pool.size == 44 and not (set(pool.image_ids.tolist()) & out)
    rng = np.random.default_rng(0)
    draws = rng.choice(pool.size, size=9, replace=False)
    for method in ("stouffer", "ttest"):
        refs = sample_references(method, Pool(pool.voxels, pool.values, pool.image_ids, pool.collection_ids,
                                              pool.weights), draws, [5, 9], 0.5)  # fmt: skip
        for j, k in enumerate([5, 9]):
            z, _, cnt = combine(method, pool.values[draws[:k]].astype(np.float64))
            z[cnt < min_count(method, k, 0.5)] = np.nan
            np.testing.assert_allclose(refs[j], z, rtol=1e-9, atol=1e-9)


def test_pairwise_r_matches_numpy_with_missing_values():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((3, 200))
    r = rng.standard_normal((4, 200)) + 0.5 * x[0]
    x[0, :30] = np.nan
    r[2, 100:150] = np.nan
    got = pairwise_r(x, r)
    for i in range(3):
        for j in range(4):
            ok = np.isfinite(x[i]) & np.isfinite(r[j])
            assert got[i, j] == pytest.approx(np.corrcoef(x[i, ok], r[j, ok])[0, 1], abs=1e-12)


def test_no_decodable_term_is_said_loudly(world, caplog):
    """An analysis made of whole atlas collections of every task leaves nothing to decode against:
    every row says why, the figure and summary say it, and the log warns."""
    ts = world["atlas_maps"]
    a, refs = references(world, "everything", ts.maps[::4])
    assert not refs["decodable"].any()
    with caplog.at_level(logging.WARNING):
        df = decode(world, a, [("map", world["zmaps"][ts.maps[0].image_id])], n_null=19)
    assert df["r"].isna().all() and df["note"].str.startswith("not decodable").all()
    assert "No atlas term is decodable" in json.loads((a / "decode/summary.json").read_text())["note"]
    from nvmeta.decode.decoding import describe_decoding

    assert describe_decoding(a / "decode/decoding.tsv")[0].startswith(
        "map: no atlas term to decode against (not decodable"
    )
    assert any("no atlas term is" in r.getMessage().lower() for r in caplog.records)


# ------------------------------------------------------------------------------------------ hygiene


def hygiene_dump(tmp_path):
    """A dump holding every case the hygiene terms leave out, and one map that passes."""
    from nvmeta.testing.dump import write_dump

    cols = [  # id, name, owner
        (1, "a real study", 7), (2, "Neuroscout: a model", 5761), (3, "bob's temporary collection", 8),
        (4, "a bulk upload", 9), (5, "None task study", 7),
    ]  # fmt: skip
    maps = [(10, 1, "trm_nback"), (20, 2, "trm_nback"), (30, 3, "trm_nback"), (50, 5, "None")]
    maps += [(1000 + k, 4, "trm_nback") for k in range(1001)]  # collection 4: 1,001 maps
    tables = {
        "collection": [{"id": c, "name": n, "private": "f", "owner_id": o} for c, n, o in cols],
        "item": [{"id": i, "name": f"map {i}", "collection_id": c, "is_valid": "t"} for i, c, _ in maps],
        "image": [{"basecollectionitem_ptr_id": i, "file": f"images/{c}/m{i}.nii.gz"} for i, c, _ in maps],
        "statmap": [
            {
                "image_ptr_id": i,
                "map_type": "Z",
                "analysis_level": "G",
                "modality": "fMRI-BOLD",
                "cognitive_paradigm_cogatlas_id": t,
                "is_thresholded": "f",
                "not_mni": "f",
                "number_of_subjects": "20",
            }
            for i, _, t in maps
        ],  # fmt: skip
        "task": [
            {"name": "n-back task", "cog_atlas_id": "trm_nback"},
            {"name": "None / Other", "cog_atlas_id": "None"},
        ],
        "contrast": [],
    }
    return write_dump(tmp_path / "hygiene.tar.gz", tables)


def test_hygiene_terms_leave_out_the_exports_non_studies_with_funnel_counts(tmp_path):
    from nvmeta.decode.atlas import selection_cfg
    from nvmeta.neurovault.dump import DumpSource
    from nvmeta.select.hygiene import with_hygiene
    from nvmeta.select.query import select

    src = DumpSource(hygiene_dump(tmp_path), "https://neurovault.org/media/", max_field_bytes=FIELD_BYTES)
    cfg = query_selection({"image_terms": {"map_type": "Z map"}}, max_images=None)
    records, _ = select(src, cfg, LOG)
    assert len(records) == 1005  # without hygiene: every map
    records, funnel = select(src, with_hygiene(cfg), LOG)
    assert [r["id"] for r in records] == [10]
    # one collection left out per term (the bulk upload's 1,001 maps and the None task's one map)
    assert funnel["collections_rejected_by_term"] == {
        "collection_terms.number_of_images": 1, "collection_terms.owner": 1, "collection_terms.name": 1,
    }  # fmt: skip
    assert funnel["images_rejected_by_term"]["image_terms.cognitive_paradigm_cogatlas_id"] == 1
    assert funnel["images_examined"] == 2  # collections 1 and 5 listed; 2, 3 and 4 never
    # the atlas applies them by default; a term of the user's on the same field replaces one
    atlas = {**defaults("atlas"), "image_terms": {"map_type": "Z map"}}
    records, _ = select(src, selection_cfg(atlas), LOG)
    assert [r["id"] for r in records] == [10]
    records, _ = select(src, selection_cfg({**atlas, "collection_terms": {"owner": {"ne": 1}}}), LOG)
    assert sorted(r["id"] for r in records) == [10, 20]
    records, _ = select(src, selection_cfg({**atlas, "hygiene": False}), LOG)
    assert len(records) == 1005


# ------------------------------------------------------------------------------------------- config


def _check(cfg):
    from nvmeta.workflow.config import SCHEMA_PATH, check_config

    return check_config(cfg, SCHEMA_PATH)


@pytest.mark.parametrize(
    ("atlas", "decode_block", "key", "says"),
    [
        (None, {}, "analyses.a.decode", "decoding needs a task atlas"),
        (
            {"image_terms": {"map_type": {"bogus": 1}}},
            {},
            "atlas.image_terms.map_type",
            "unknown filter operator",
        ),
        ({"method": "dersimonian_laird"}, {}, "atlas.method", "stouffer"),
        ({}, {"leave_out": "nothing"}, "analyses.a.decode.leave_out", "collections"),
        ({}, {"n_null": 5}, "analyses.a.decode.n_null", ">= 10"),
    ],
)
def test_broken_decoding_config_stops_naming_the_key(atlas, decode_block, key, says):
    cfg = {"neurovault": {"url": "https://neurovault.org/api/"},
           "analyses": {"a": {"image_ids": [1], "meta": {}, "decode": decode_block}}}  # fmt: skip
    if atlas is not None:
        cfg["atlas"] = atlas
    with pytest.raises(ConfigError) as exc:
        _check(cfg)
    assert f"config key {key}" in str(exc.value) and says in str(exc.value)


def test_decode_needs_a_result_map():
    cfg = {"neurovault": {"url": "https://neurovault.org/api/"}, "atlas": {},
           "analyses": {"a": {"image_ids": [1], "decode": {}}}}  # fmt: skip
    with pytest.raises(ConfigError, match=r"analyses\.a\.decode: the analysis has no result map"):
        _check(cfg)


def test_atlas_defaults_from_the_schema():
    cfg = _check({"neurovault": {"url": "https://neurovault.org/api/"}, "atlas": {},
                  "analyses": {"a": {"image_ids": [1], "meta": {}, "decode": {}}}})  # fmt: skip
    atlas = cfg["atlas"]
    assert atlas["group_by"] == "cognitive_paradigm_cogatlas" and atlas["method"] == "stouffer"
    assert atlas["image_terms"] == {"map_type": {"in": ["T map", "Z map"]}, "analysis_level": "group",
                                    "modality": "fMRI-BOLD"} and atlas["hygiene"] is True  # fmt: skip
    assert cfg["analyses"]["a"]["decode"] == {"leave_out": "collections", "n_null": 1000, "random_state": 0,
                                              "n_top": 10}  # fmt: skip
    assert cfg["analyses"]["a"]["hygiene"] is False


# ------------------------------------------------------------------------------------- end to end

E2E_TASKS = task_names(3)


def e2e_world(root: Path):
    """A snapshot: 3 tasks x 3 collections x 3 maps for the atlas, a held-out collection of 4 maps of
    task 0 (the analysis), and the hygiene cases (Neuroscout, a temporary collection, a "None" task)."""
    from nvmeta.testing.tasks import write_task_snapshot

    mask = small_mask()
    nib.save(mask, root / "mask.nii.gz")
    atlas_maps = make_task_maps(mask, E2E_TASKS, 3, 3, seed=4)
    probe = make_task_maps(mask, E2E_TASKS[:1], 1, 4, seed=5, first_id=30001, first_cid=951,
                           signatures_from=atlas_maps)  # fmt: skip
    junk = make_task_maps(mask, E2E_TASKS[1:2], 2, 3, seed=6, first_id=40001, first_cid=971,
                          signatures_from=atlas_maps)  # fmt: skip
    snap = root / "snapshot"
    write_task_snapshot(snap, atlas_maps)
    write_task_snapshot(snap, probe)
    write_task_snapshot(snap, junk, owner_of={971: 5761}, name_of={972: "bob's temporary collection"})
    return mask, atlas_maps, probe, snap


def e2e_config(snap: Path, probe_cid: int) -> dict:
    return {
        "neurovault": {"url": str(snap)},
        "template": {"mask": "mask.nii.gz"},
        "atlas": {"min_maps": 3, "min_collections": 2, "null_voxels": 800},
        "analyses": {
            "probe": {
                "collection_ids": [probe_cid],
                "meta": {"methods": ["stouffer"], "jackknife": False},
                "ica": {"n_components": 2, "n_terms": 2},
                "decode": {"n_null": 99},
            },
            # an analysis that opts into the hygiene terms: the Neuroscout and temporary collections go
            "clean": {
                "image_terms": {"cognitive_paradigm_cogatlas": E2E_TASKS[1]},
                "max_images": 1000,
                "hygiene": True,
            },  # fmt: skip
        },
    }


@pytest.mark.e2e
def test_workflow_atlas_decode_and_a_rerun_of_one_term(tmp_path):
    """snakemake end to end on a synthetic NeuroVault: the atlas leaves the hygiene cases out, the
    analysis' meta-analysis decodes to its task, the ICA labels come from decoding, and new maps of
    one task rerun that task's atlas job only."""
    from helpers import make_workdir, run_snakemake
    from test_reruns import ran

    mask, atlas_maps, probe, snap = e2e_world(tmp_path)
    wf = make_workdir(tmp_path, e2e_config(snap, 951))
    shutil.copy(tmp_path / "mask.nii.gz", wf / "mask.nii.gz")
    run_snakemake(wf)
    res = wf / "results"
    table = pd.read_csv(res / "atlas/atlas.tsv", sep="\t")
    # the probe's own collection (task 0) is in the atlas' selection but left out of its reference
    assert dict(zip(table["term"], table["n_maps"], strict=True)) == {E2E_TASKS[0]: 13, E2E_TASKS[1]: 9,
                                                                     E2E_TASKS[2]: 9}  # fmt: skip
    funnel = json.loads((res / "atlas/query_funnel.json").read_text())
    assert funnel["collections_rejected_by_term"]["collection_terms.owner"] == 1
    assert funnel["collections_rejected_by_term"]["collection_terms.name"] == 1
    clean = json.loads((res / "analyses/clean/query_funnel.json").read_text())
    assert clean["selected"] == 9 and clean["collections_rejected_by_term"]["collection_terms.owner"] == 1
    assert clean["collections_rejected_by_term"]["collection_terms.name"] == 1
    refs = pd.read_csv(res / "analyses/probe/decode/references.tsv", sep="\t")
    assert refs.set_index("term").loc[E2E_TASKS[0], "n_maps"] == 9
    dec = pd.read_csv(res / "analyses/probe/decode/decoding.tsv", sep="\t")
    assert set(dec["source"]) == {"meta/stouffer", "ica/component_0", "ica/component_1"}
    top = dec[dec["source"] == "meta/stouffer"].sort_values("rank").iloc[0]
    assert top["term"] == E2E_TASKS[0] and top["p_null"] <= 0.05 and top["n_maps"] == 9
    ica = json.loads((res / "analyses/probe/ica/summary.json").read_text())
    terms = pd.read_csv(res / "analyses/probe/ica/terms.tsv", sep="\t")
    for k, source in enumerate(ica["label_sources"]):
        got = terms[terms["component"] == k].sort_values("rank")
        want = dec[(dec["source"] == f"ica/component_{k}") & (dec["r"] > 0)].sort_values("rank").head(2)
        if source == "atlas":  # the labels are the decoding's top terms, with its r
            assert got["term"].tolist() == want["term"].tolist()
            np.testing.assert_allclose(got["weight"], want["r"], atol=1e-9)
    assert "atlas" in ica["label_sources"]
    # rerun: 3 new maps of task 1 in a new collection; only that term's job reruns
    before = {p.parent.name: p.stat().st_mtime_ns for p in (res / "atlas").glob("*/z.nii.gz")}
    from nvmeta.testing.tasks import write_task_snapshot

    more = make_task_maps(mask, E2E_TASKS[1:2], 1, 3, seed=9, first_id=50001, first_cid=991,
                          signatures_from=atlas_maps)  # fmt: skip
    write_task_snapshot(snap, more)
    proc = run_snakemake(wf, "--forcerun", "atlas_query")
    assert [wc["term"] for wc in ran(proc.stdout, "atlas_term")] == [slug(E2E_TASKS[1])]
    assert len(ran(proc.stdout, "zmap")) == 3 and len(ran(proc.stdout, "atlas_table")) == 1
    after = {p.parent.name: p.stat().st_mtime_ns for p in (res / "atlas").glob("*/z.nii.gz")}
    changed = {s for s in before if before[s] != after[s]}
    assert changed == {slug(E2E_TASKS[1])}
    table = pd.read_csv(res / "atlas/atlas.tsv", sep="\t")
    assert table.set_index("term").loc[E2E_TASKS[1], "n_maps"] == 12
    # and a plain rerun does nothing
    proc = run_snakemake(wf)
    assert "Nothing to be done" in proc.stdout
