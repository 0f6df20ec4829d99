"""Config-driven reruns: editing the config reruns exactly what the edit touches.

Asserted with Snakemake's own job list (the jobs it reports running, with their wildcards) and
the fixture server's request log.
"""

from __future__ import annotations

import copy
import hashlib
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml
from helpers import SNAPSHOT, make_workdir, run_snakemake

from nvmeta.testing.server import FixtureServer

pytestmark = [pytest.mark.e2e, pytest.mark.rerun]

A_IDS = [990001, 990002, 990003, 990004]
B_IDS = [990005, 990006, 990007]
NEW_ID = 990008

JOB_RE = re.compile(r"^(?:local)?(?:rule|checkpoint) (\w+):\n(.*?)(?=^\S)", re.M | re.S)


def jobs(stdout: str) -> list[tuple[str, dict]]:
    """(rule, wildcards) of every job Snakemake reports starting."""
    out = []
    for rule, body in JOB_RE.findall(stdout + "\nEND"):
        m = re.search(r"^\s+wildcards: (.*)$", body, re.M)
        wc = dict(kv.split("=", 1) for kv in m.group(1).split(", ")) if m else {}
        out.append((rule, wc))
    return out


def ran(stdout: str, rule: str) -> list[dict]:
    return [wc for r, wc in jobs(stdout) if r == rule]


def config(url: str) -> dict:
    return {
        "neurovault": {"url": url, "retries": 1, "backoff": 0.0, "timeout": 20},
        "conversion": {"df": "n-1"},
        "analyses": {
            "A": {"image_ids": list(A_IDS), "meta": {"methods": ["stouffer"]}},
            "B": {"image_ids": list(B_IDS), "meta": {"methods": ["stouffer"]}},
        },
    }


def media_requests(srv: FixtureServer) -> int:
    return sum(1 for p in srv.requests if "/media/" in p)


def digest(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    with FixtureServer(SNAPSHOT) as srv:
        cfg = config(srv.url)
        wf = make_workdir(tmp_path_factory.mktemp("reruns"), cfg)
        proc = run_snakemake(wf)
        assert len(ran(proc.stdout, "download")) == len(A_IDS) + len(B_IDS)
        assert len(ran(proc.stdout, "zmap")) == len(A_IDS) + len(B_IDS)
        yield srv, wf, cfg


def rerun(srv, wf, cfg, *args):
    (wf / "test.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    before_all, before_media = len(srv.requests), media_requests(srv)
    proc = run_snakemake(wf, *args)
    return proc, len(srv.requests) - before_all, media_requests(srv) - before_media


def test_a_add_image_reruns_that_image_and_that_analysis(setup):
    srv, wf, cfg = setup
    cfg = copy.deepcopy(cfg)
    cfg["analyses"]["A"]["image_ids"].append(NEW_ID)
    b_z = digest(wf / "results/analyses/B/meta/stouffer/z.nii.gz")
    proc, _, media = rerun(srv, wf, cfg)
    out = proc.stdout
    assert ran(out, "query") == [{"analysis": "A"}]
    assert ran(out, "download") == [{"image_id": str(NEW_ID)}]
    assert ran(out, "zmap") == [{"image_id": str(NEW_ID)}]
    # and the table of the batch it joins (all 8 images fit in batch 0)
    assert ran(out, "zmap_batch") == [{"batch": "0"}]
    assert ran(out, "qc") == [{"analysis": "A"}]
    assert {wc["analysis"] for r, wc in jobs(out) if "analysis" in wc} == {"A"}
    assert ran(out, "meta") == [{"analysis": "A", "method": "stouffer"}]
    assert media == 1, "only the new image's map may be downloaded"
    assert digest(wf / "results/analyses/B/meta/stouffer/z.nii.gz") == b_z
    setup[2]["analyses"]["A"]["image_ids"].append(NEW_ID)


def test_b_meta_parameter_reruns_only_that_fan_in(setup):
    srv, wf, cfg = setup
    cfg = copy.deepcopy(cfg)
    cfg["analyses"]["A"]["meta"]["alpha"] = 0.01
    proc, requests, _ = rerun(srv, wf, cfg)
    names = [r for r, _ in jobs(proc.stdout) if r != "all"]
    # the analysis' overview page and methods paragraph read the meta summary and settings, so
    # they are redone with it
    assert sorted(names) == ["meta", "methods", "overview"], names
    assert ran(proc.stdout, "overview") == [{"analysis": "A"}]
    assert ran(proc.stdout, "methods") == [{"analysis": "A"}]
    assert ran(proc.stdout, "meta") == [{"analysis": "A", "method": "stouffer"}]
    assert requests == 0, "nothing may be downloaded"
    setup[2]["analyses"]["A"]["meta"]["alpha"] = 0.01


def test_c_template_change_reruns_resampling_and_fan_ins_without_downloads(setup):
    srv, wf, cfg = setup
    cfg = copy.deepcopy(cfg)
    # A new template: the MNI mask without its top 10 slices (same grid, different mask).
    mni = nib.load(wf / "results/template/mask.nii.gz")
    data = np.asarray(mni.dataobj).copy()
    data[:, :, -10:] = 0
    nib.save(nib.Nifti1Image(data, mni.affine), wf / "mask_cut.nii.gz")
    cfg["template"] = {"mask": "mask_cut.nii.gz"}
    proc, requests, _ = rerun(srv, wf, cfg)
    out = proc.stdout
    n = len(A_IDS) + 1 + len(B_IDS)
    assert len(ran(out, "template")) == 1
    assert sorted(int(wc["image_id"]) for wc in ran(out, "zmap")) == sorted([*A_IDS, NEW_ID, *B_IDS])
    assert len(ran(out, "zmap")) == n
    assert sorted(wc["analysis"] for wc in ran(out, "qc")) == ["A", "B"]
    assert sorted(wc["analysis"] for wc in ran(out, "meta")) == ["A", "B"]
    assert ran(out, "download") == [] and ran(out, "query") == []
    assert requests == 0
    z = nib.load(wf / "results/images/990001/zmap.nii.gz").get_fdata()
    assert np.isnan(z[:, :, -10:]).all() and np.isfinite(z).any()
    setup[2]["template"] = {"mask": "mask_cut.nii.gz"}


def test_d_offline_mode_sends_no_request(setup):
    srv, wf, cfg = setup
    cfg = copy.deepcopy(cfg)
    cfg["neurovault"]["mode"] = "offline"
    proc, requests, _ = rerun(srv, wf, cfg)
    assert [r for r, _ in jobs(proc.stdout) if r != "all"] == [], "mode is not a rerun trigger"
    assert requests == 0
    # Forcing the query and every download in offline mode reads the disk only.
    before = {i: digest(wf / f"results/images/{i}/map.nii.gz") for i in A_IDS}
    proc, requests, _ = rerun(srv, wf, cfg, "--forcerun", "query", "download")
    assert len(ran(proc.stdout, "download")) == len(A_IDS) + 1 + len(B_IDS)
    assert requests == 0, srv.requests[-5:]
    assert {i: digest(wf / f"results/images/{i}/map.nii.gz") for i in A_IDS} == before


def _without_source(selection_tsv: str) -> list[list[str]]:
    rows = [line.split("\t") for line in selection_tsv.splitlines()]
    col = rows[0].index("record_source")
    return [row[:col] + row[col + 1 :] for row in rows]


def test_e_unreadable_selection_stops_with_the_fix_and_is_never_deleted(setup):
    """A selection.tsv with an id written as a float (an older version's output, or edited by hand)
    stops every run, dry runs included, before any job, with one message naming the file and the
    fix; the file is left as it is (reading the workflow deletes nothing). The fix given, a forced
    query, rewrites it."""
    srv, wf, cfg = setup
    (wf / "test.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    sel = wf / "results/analyses/A/selection.tsv"
    good = sel.read_text()
    sel.write_text(good.replace(f"\n{A_IDS[0]}\t", f"\n{A_IDS[0]}.0\t", 1))
    broken = sel.read_bytes()
    assert f"{A_IDS[0]}.0\t".encode() in broken
    fix = f"--forcerun {sel.relative_to(wf)}"
    for args in (["-n"], []):
        before = len(srv.requests)
        proc = run_snakemake(wf, *args, check=False)
        assert proc.returncode != 0, proc.stdout[-3000:]
        assert f"{sel.relative_to(wf)} is unreadable (line 2: image_id '{A_IDS[0]}.0'" in proc.stdout
        assert f"Fix: run the same command with {fix} " in proc.stdout, proc.stdout[-3000:]
        assert "invalid literal" not in proc.stdout and jobs(proc.stdout) == []
        assert sel.read_bytes() == broken and len(srv.requests) == before
    proc, _, media = rerun(srv, wf, cfg, *fix.split())
    assert ran(proc.stdout, "query") == [{"analysis": "A"}]
    # the same selection (record_source names where the records came from: the previous query
    # may have run offline, from results/, this one asked the server)
    assert _without_source(sel.read_text()) == _without_source(good) and media == 0
    # Unreadable and edited out of the config at the same time: its query has to run anyway
    # (its params changed), so the file is never read and the new query wins.
    sel.write_bytes(broken)
    cfg = copy.deepcopy(cfg)
    cfg["analyses"]["A"]["image_ids"] = A_IDS[1:]
    proc, _, media = rerun(srv, wf, cfg)
    assert ran(proc.stdout, "query") == [{"analysis": "A"}]
    ids = [line.split("\t", 1)[0] for line in sel.read_text().splitlines()[1:]]
    assert ids == [str(i) for i in A_IDS[1:]] and media == 0


def test_f_selection_without_its_funnel_is_queried_again(setup):
    """A selection.tsv without the query_funnel.json beside it (an older nvmeta's results, or the
    funnel deleted) left the query checkpoint incomplete but not rerun: the QC job then started
    with unresolved inputs and failed (``invalid literal for int()``). The funnel is a target of
    the run, so its query runs again; nothing is deleted to get there."""
    srv, wf, cfg = setup
    rerun(srv, wf, cfg)  # the module's config again (test_e edited it)
    analysis = wf / "results/analyses/A"
    good = (analysis / "selection.tsv").read_text()
    (analysis / "query_funnel.json").unlink()
    for name in ("qc.tsv", "funnel.tsv"):
        (analysis / name).unlink()
    proc, _, media = rerun(srv, wf, cfg)
    assert "invalid literal" not in proc.stdout and "Traceback" not in proc.stdout
    assert ran(proc.stdout, "query") == [{"analysis": "A"}]
    assert ran(proc.stdout, "qc") == [{"analysis": "A"}]
    assert (analysis / "query_funnel.json").is_file() and (analysis / "qc.tsv").is_file()
    assert _without_source((analysis / "selection.tsv").read_text()) == _without_source(good)
    assert media == 0


def test_g_dropped_method_is_swept_by_a_real_run_never_by_a_dry_run(setup):
    """After a method left meta.methods, its meta/<method>/ folder (and a sensitivity table that
    compared it) stayed on disk, indistinguishable from a result of the current run."""
    srv, wf, cfg = setup
    rerun(srv, wf, cfg)  # the module's config again (test_e edited it)
    cfg = copy.deepcopy(cfg)
    meta_b = wf / "results/analyses/B/meta"
    cfg["analyses"]["B"]["meta"]["methods"] = ["stouffer", "fisher"]
    proc, requests, _ = rerun(srv, wf, cfg)
    assert ran(proc.stdout, "meta") == [{"analysis": "B", "method": "fisher"}] and requests == 0
    assert (meta_b / "fisher" / "z.nii.gz").is_file() and (meta_b / "sensitivity.tsv").is_file()
    stouffer_b = digest(meta_b / "stouffer" / "z.nii.gz")
    stouffer_a = digest(wf / "results/analyses/A/meta/stouffer/z.nii.gz")

    cfg["analyses"]["B"]["meta"]["methods"] = ["stouffer"]
    # a dry run plans the sweep (the overview job) and deletes nothing
    proc, _, _ = rerun(srv, wf, cfg, "-n")
    assert ran(proc.stdout, "overview") == [{"analysis": "B"}]
    assert (meta_b / "fisher" / "z.nii.gz").is_file() and (meta_b / "sensitivity.tsv").is_file()
    proc, requests, _ = rerun(srv, wf, cfg)
    assert ran(proc.stdout, "overview") == [{"analysis": "B"}] and ran(proc.stdout, "meta") == []
    assert not (meta_b / "fisher").exists() and not (meta_b / "sensitivity.tsv").exists()
    assert "results/analyses/B/meta/fisher/ removed: method fisher is no longer in" in proc.stdout
    assert "results/analyses/B/meta/sensitivity.tsv removed" in proc.stdout
    # what the config still asks for is untouched, here and in the other analysis
    assert digest(meta_b / "stouffer" / "z.nii.gz") == stouffer_b
    assert digest(wf / "results/analyses/A/meta/stouffer/z.nii.gz") == stouffer_a
    assert sorted(p.name for p in meta_b.iterdir()) == ["stouffer"] and requests == 0


# ----------------------------------------------------------------------------- a changed dump
def dump_config(url: str, dump: Path) -> dict:
    cfg = config(url)
    cfg["neurovault"]["dump"] = str(dump)
    cfg["analyses"]["A"]["meta"]["methods"] = ["stouffer", "fixed_effects_hedges"]
    return cfg


@pytest.fixture(scope="module")
def dump_setup(tmp_path_factory):
    from nvmeta.testing.dump import snapshot_tables, write_dump

    tmp = tmp_path_factory.mktemp("dump_reruns")
    dump = tmp / "export.tar.gz"
    write_dump(dump, snapshot_tables(SNAPSHOT, A_IDS + B_IDS))
    with FixtureServer(SNAPSHOT) as srv:
        cfg = dump_config(srv.url, dump)
        wf = make_workdir(tmp, cfg)
        proc = run_snakemake(wf)
        assert len(ran(proc.stdout, "download")) == len(A_IDS) + len(B_IDS)
        assert not [p for p in srv.requests if "/api/" in p]  # records from the dump only
        yield srv, wf, cfg, dump


def test_h_a_changed_record_in_a_new_dump_reaches_every_consumer(dump_setup):
    """A new export in which image 990001 has number_of_subjects 50 instead of 25, copied over the
    old one with an older mtime (cp -p): the query reran but qc.json, metadata.json and every g and
    weight kept 25. Now exactly that image's download (map reused, record rewritten) and z-map
    rerun, and every consumer reads 50; the other images are untouched."""
    import json
    import os
    import shutil

    import pandas as pd
    from scipy import stats

    from nvmeta.testing.dump import snapshot_tables, write_dump

    srv, wf, cfg, dump = dump_setup
    iid, others = A_IDS[0], [*A_IDS[1:], *B_IDS]
    images = wf / "results/images"
    assert json.loads((images / f"{iid}/qc.json").read_text())["n"] == 25
    untouched = {
        i: (digest(images / f"{i}/metadata.json"), digest(images / f"{i}/zmap.nii.gz")) for i in others
    }
    tables = snapshot_tables(SNAPSHOT, A_IDS + B_IDS)
    for stat in tables["statmap"]:
        if stat["image_ptr_id"] == iid:
            stat["number_of_subjects"] = 50
    new = write_dump(dump.with_name("export_2024.tar.gz"), tables)
    os.utime(new, (1_000_000_000, 1_000_000_000))
    shutil.copy2(new, dump)
    proc, requests, media = rerun(srv, wf, cfg)
    out = proc.stdout
    assert sorted(wc["analysis"] for wc in ran(out, "query")) == ["A", "B"]
    assert ran(out, "download") == [{"image_id": str(iid)}]
    assert ran(out, "zmap") == [{"image_id": str(iid)}]
    assert requests == 0 and media == 0, "the map on disk is reused"
    for name in ("metadata.json", "metadata.cache.json"):
        assert json.loads((images / f"{iid}/{name}").read_text())["number_of_subjects"] == 50
    qc = json.loads((images / f"{iid}/qc.json").read_text())
    assert (qc["n"], qc["df"], qc["n_source"]) == (50, 49.0, "number_of_subjects")
    # g and var(g) from the new z-map with n = 50, df = 49: scipy's t quantile and Hedges' formulas
    mask = np.asarray(nib.load(wf / "results/template/mask.nii.gz").dataobj) > 0
    z = nib.load(images / f"{iid}/zmap.nii.gz").get_fdata()[mask]
    ok = np.isfinite(z)
    t = stats.t.isf(stats.norm.sf(z[ok]), 49)
    j = 1 - 3 / (4 * 49 - 1)
    d = t / np.sqrt(50)
    g = nib.load(images / f"{iid}/g.nii.gz").get_fdata()[mask][ok]
    varg = nib.load(images / f"{iid}/varg.nii.gz").get_fdata()[mask][ok]
    np.testing.assert_allclose(g, j * d, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(varg, 49 * (1 + 50 * d**2) * j**2 / (50 * 47) - d**2, rtol=1e-5, atol=1e-6)
    # the fan-ins read it too: the QC table, the inputs table of the meta-analysis
    qc_tsv = pd.read_csv(wf / "results/analyses/A/qc.tsv", sep="\t").set_index("image_id")
    assert qc_tsv.loc[iid, "number_of_subjects"] == 50 and qc_tsv.loc[iid, "n"] == 50
    inputs = pd.read_csv(wf / "results/analyses/A/figures/inputs.tsv", sep="\t").set_index("image_id")
    assert inputs.loc[iid, "n"] == 50
    sel = pd.read_csv(wf / "results/analyses/B/selection.tsv", sep="\t")
    assert set(sel["record_source"]) == {
        f"dump {dump.resolve()} bytes={dump.stat().st_size} sha256={hashlib.sha256(dump.read_bytes()).hexdigest()}"
    }
    assert {
        i: (digest(images / f"{i}/metadata.json"), digest(images / f"{i}/zmap.nii.gz")) for i in others
    } == untouched
    # nothing changed since: nothing runs
    proc, requests, _ = rerun(srv, wf, cfg)
    assert [r for r, _ in jobs(proc.stdout) if r != "all"] == [] and requests == 0
