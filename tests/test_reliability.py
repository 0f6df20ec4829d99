"""Reliability, end to end: snakemake against the fixture server under faults, kills and hostile input.

Every test runs the real workflow (``python -m snakemake`` on a temporary copy, see ``helpers.py``)
against :class:`nvmeta.testing.server.FixtureServer` serving a small snapshot of real maps from
``tests/data/snapshot``, and checks the outputs on disk:

- fault matrix: each fault of the issue on its own image (or listing page) in one run; the image
  either recovers (map md5 == served bytes) or is excluded with its own reason in qc.tsv and
  metadata.json; no partial file anywhere under results/; the other images unaffected.
  The matrix (fault x outcome) is printed at the end and written to ``fault_matrix.md``;
- interruption and resume: SIGKILL of the Snakemake process group during the downloads and during
  the per-image conversion, rerun, nothing complete fetched again, outputs byte-identical to an
  uninterrupted run;
- hostile input: ids, file URLs, sizes, JSON pages, broken maps, code-looking strings.

Run alone with ``pytest -m reliability``.
"""

from __future__ import annotations

import copy
import gzip
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import fast_config
from helpers import REPO, SNAKEMAKE, SNAPSHOT, make_workdir

from nvmeta.neurovault.layout import write_snapshot
from nvmeta.testing.server import FixtureServer
from nvmeta.workflow.config import defaults

pytestmark = pytest.mark.reliability

PAIN_CID = 1425
PAIN = list(range(990001, 990022))  # the 21 real group pain t-maps of the bundled snapshot


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------
def md5_bytes(b: bytes) -> str:
    return hashlib.md5(b).hexdigest()


def md5_file(p: Path) -> str:
    return md5_bytes(Path(p).read_bytes())


def bundled_record(iid: int) -> dict:
    return json.loads((SNAPSHOT / "api" / "images" / f"{iid}.json").read_text())


def bundled_collection(cid: int) -> dict:
    return json.loads((SNAPSHOT / "api" / "collections" / f"{cid}.json").read_text())


def media_rel(rec: dict) -> str:
    """``media/...`` path of a record's file inside a snapshot."""
    return "media/" + rec["file"].split("/media/", 1)[1]


def media_regex(rec: dict) -> str:
    return "^/" + re.escape(media_rel(rec)) + "$"


def record_regex(iid: int) -> str:
    return rf"^/api/images/{iid}/"


def nv_config(url: str, **kw) -> dict:
    return fast_config(url, **{"timeout": 1.0, "retries": 2, "backoff": 0.01, **kw})


def wf_config(url: str, analyses: dict, **nv) -> dict:
    return {
        "neurovault": nv_config(url, **nv),
        "template": {"mask": "mni152_2mm"},
        "conversion": {"df": "n-1"},
        "analyses": analyses,
    }


def qc_targets(analyses) -> list[str]:
    return [f"results/analyses/{a}/qc.tsv" for a in analyses]


def snakemake_cmd(targets) -> list[str]:
    """The command a user runs (targets first: ``--configfile`` takes several values)."""
    return [*SNAKEMAKE, *targets, "--cores", "2", "--configfile", "test.yaml"]


def run(wf: Path, targets, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        snakemake_cmd(targets),
        cwd=wf,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
        env=dict(os.environ, PYTHONWARNINGS="ignore"),
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake failed ({proc.returncode}):\n{proc.stdout[-8000:]}")
    return proc


def read_qc(wf: Path, analysis: str) -> pd.DataFrame:
    return pd.read_csv(wf / f"results/analyses/{analysis}/qc.tsv", sep="\t", dtype={"reason": str})


def image_dir(wf: Path, iid: int) -> Path:
    return wf / "results" / "images" / str(iid)


def metadata(wf: Path, iid: int) -> dict:
    return json.loads((image_dir(wf, iid) / "metadata.json").read_text())


ALLOWED = [
    r"results/analyses/[A-Za-z0-9_-]+/(selection|qc|funnel)\.tsv",
    r"results/analyses/[A-Za-z0-9_-]+/query_funnel\.json",
    r"results/analyses/[A-Za-z0-9_-]+/qc_consensus\.json",
    r"results/records/[1-9][0-9]*\.json",
    r"results/images/[1-9][0-9]*/(metadata\.json|metadata\.cache\.json|map\.nii\.gz|zmap\.nii\.gz|qc\.json)",
    r"results/collections/[1-9][0-9]*\.json",
    r"results/template/mask\.nii\.gz",
    r"results/batches/(plan|zmaps_[0-9]+)\.tsv",
    r"results/logs/[a-z]+/[A-Za-z0-9_-]+\.log",
    r"results/logs/template\.log",
]


def assert_clean_results(wf: Path) -> list[str]:
    """Every file under results/ is an expected output (no ``.part``, no temp dir, nothing else)."""
    files = sorted(p.relative_to(wf).as_posix() for p in (wf / "results").rglob("*") if not p.is_dir())
    bad = [f for f in files if ".part" in f or not any(re.fullmatch(rx, f) for rx in ALLOWED)]
    assert not bad, f"unexpected files under results/: {bad}"
    dirs = [p for p in (wf / "results").rglob("*") if p.is_dir() and ".part" in p.name]
    assert not dirs, dirs
    return files


def assert_outputs_complete(wf: Path) -> list[str]:
    """After a kill: every file at an output path is complete (JSON parses, gzip and NIfTI load, TSV
    has its header); temporaries may exist next to them. Returns the temporaries."""
    temps = []
    for p in (wf / "results").rglob("*"):
        if p.is_dir() or "/logs/" in p.as_posix():
            continue
        if ".part" in p.name:
            temps.append(p.relative_to(wf).as_posix())
            continue
        if p.suffix == ".json":
            json.loads(p.read_text())
        elif p.name.endswith(".nii.gz"):
            gzip.decompress(p.read_bytes())
            nib.load(p).get_fdata()
        elif p.suffix == ".tsv":
            assert p.read_text().startswith(("image_id\t", "stage\t")), p
    return temps


def assert_map_consistency(wf: Path, ids) -> None:
    """map.nii.gz exists iff status ok; its md5 is the recorded one."""
    for iid in ids:
        m = metadata(wf, iid)["nvmeta"]
        mp = image_dir(wf, iid) / "map.nii.gz"
        assert mp.exists() == (m["status"] == "ok"), (iid, m)
        if mp.exists():
            assert md5_file(mp) == m["map_md5"]


# The fault matrix, filled by the tests below and printed (and written) at the end of the module.
MATRIX: list[dict] = []


@pytest.fixture(scope="module", autouse=True)
def _print_matrix(tmp_path_factory):
    yield
    if not MATRIX:
        return
    lines = [
        "| fault | stage | outcome | reason (qc.tsv) |",
        "|---|---|---|---|",
    ]
    for row in MATRIX:
        reason = row["reason"] if isinstance(row["reason"], str) else ""
        reason = reason.replace("|", "\\|")
        lines.append(f"| {row['fault']} | {row['stage']} | {row['outcome']} | {reason} |")
    text = "\n".join(lines) + "\n"
    out = tmp_path_factory.mktemp("fault_matrix") / "fault_matrix.md"
    out.write_text(text)
    print(
        f"\nfault matrix (end to end, snakemake + fixture server), also in {out}:\n{text}",
        file=sys.__stdout__,
    )


# ------------------------------------------------------------------------------------------------
# 1. fault matrix
# ------------------------------------------------------------------------------------------------
# (fault, image, target, kind, times, options, expected outcome, reason substring in qc.tsv)
# target "record" = GET /api/images/{id}/ (at the download stage: the selection lists the collection),
# "media" = the map file. Options may use {localhost}: the server base with another host name.
FAULTS = [
    ("none (control)", 990001, None, None, None, {}, "recovered", None),
    ("HTTP 500 x2 then success", 990002, "media", "status", 2, {"code": 500}, "recovered", None),
    ("HTTP 502 x2 then success (record)", 990003, "record", "status", 2, {"code": 502}, "recovered", None),
    ("HTTP 503 x2 then success", 990004, "media", "status", 2, {"code": 503}, "recovered", None),
    (
        "HTTP 503 always",
        990005,
        "media",
        "status",
        None,
        {"code": 503},
        "excluded",
        "download failed: HTTP 503 after 2 retries",
    ),
    ("429 with Retry-After: 1", 990006, "media", "retry_after", 1, {"seconds": 1}, "recovered", None),
    ("body cut short (full Content-Length), once", 990007, "media", "truncate", 1, {}, "recovered", None),
    (
        "body cut short, every time",
        990008,
        "media",
        "truncate",
        None,
        {},
        "excluded",
        "download failed: download incomplete after 3 attempts",
    ),
    ("connection reset mid-file, once", 990009, "media", "reset", 1, {}, "recovered", None),
    ("reply stalls past the timeout, once", 990010, "media", "stall", 1, {"seconds": 2.5}, "recovered", None),
    (
        "reply stalls past the timeout, always",
        990011,
        "media",
        "stall",
        None,
        {"seconds": 2.5},
        "excluded",
        "download failed: timed out after 2 retries",
    ),
    (
        "404 (image record)",
        990012,
        "record",
        "status",
        None,
        {"code": 404},
        "excluded",
        "download failed: image record: not found (HTTP 404)",
    ),
    (
        "403 (map of a private collection)",
        990013,
        "media",
        "status",
        None,
        {"code": 403},
        "excluded",
        "download failed: forbidden (HTTP 403",
    ),
    (
        "HTML page with status 200 (record JSON)",
        990014,
        "record",
        "html200",
        None,
        {},
        "excluded",
        "download failed: image record: server returned HTML instead of JSON",
    ),
    (
        "HTML page with status 200 (map gzip)",
        990015,
        "media",
        "html200",
        None,
        {},
        "excluded",
        "download failed: server returned HTML instead of a NIfTI file",
    ),
    (
        "redirect to the URL without trailing slash (record)",
        990016,
        "record",
        "redirect",
        1,
        {"location": "{base}/api/images/990016"},
        "recovered",
        None,
    ),
    (
        "redirect to another host (map)",
        990017,
        "media",
        "redirect",
        1,
        {"location": "{localhost}/media/images/1425/pain_17.nidm/TStatistic.nii.gz"},
        "recovered",
        None,
    ),
    (
        "redirect loop",
        990018,
        "media",
        "redirect_loop",
        None,
        {},
        "excluded",
        "download failed: too many redirects",
    ),
    (
        "gzip decompressing to a non-NIfTI",
        990019,
        "media",
        "not_nifti",
        None,
        {},
        "excluded",
        "download failed: not a NIfTI image",
    ),
    ("connection closed without reply x2", 990020, "media", "down", 2, {}, "recovered", None),
    ("HTML page with status 200 (map), once", 990021, "media", "html200", 1, {}, "recovered", None),
]

# Listing faults (query stage): collection 1500 = 999 fillers + 396069 (last item of page 1) +
# 990032 (page 2); collection 1501 = 1000 fillers + 990031 (page 2). The query lists with limit=1000.
PAGED_DUP, PAGED_EMPTY = 1500, 1501
LISTING_FAULTS = [
    ("the same image twice across pages", "paged_dup", PAGED_DUP, "duplicate", 1, {}, [396069, 990032]),
    (
        "a page of the image list empty before count, once",
        "paged_empty",
        PAGED_EMPTY,
        "empty_page",
        1,
        {},
        [990031],
    ),
]


def filler_records(cid: int, ids) -> list[dict]:
    """Tiny records that every filter drops (anatomical maps), to make listings span pages."""
    return [
        {
            "id": i,
            "url": f"https://neurovault.org/images/{i}/",
            "file": f"https://neurovault.org/media/images/{cid}/filler_{i}.nii.gz",
            "collection": f"https://neurovault.org/collections/{cid}/",
            "collection_id": cid,
            "file_size": 100,
            "map_type": "anatomical",
            "analysis_level": "group",
            "name": f"filler {i}",
            "is_valid": True,
            "is_thresholded": False,
            "not_mni": False,
            "image_type": "statistic_map",
        }
        for i in ids
    ]


def build_fault_snapshot(root: Path) -> dict:
    """Small snapshot of real maps: the 21 pain maps and the two paged collections. Returns id -> record."""
    records = {iid: bundled_record(iid) for iid in PAIN}
    for iid, cid in ((396069, PAGED_DUP), (990032, PAGED_DUP), (990031, PAGED_EMPTY)):
        rec = bundled_record(iid)
        rec["collection_id"] = cid
        rec["collection"] = f"https://neurovault.org/collections/{cid}/"
        rec.setdefault("number_of_subjects", None)
        records[iid] = rec
    files = {media_rel(r): SNAPSHOT / media_rel(r) for r in records.values()}
    fillers = filler_records(PAGED_DUP, range(1, 1000)) + filler_records(PAGED_EMPTY, range(2001, 3001))
    pain_col = bundled_collection(PAIN_CID)
    cols = [pain_col]
    for cid in (PAGED_DUP, PAGED_EMPTY):
        c = copy.deepcopy(pain_col)
        c.update(
            id=cid, name=f"paged collection {cid}", url=f"https://neurovault.org/collections/{cid}/", DOI=None
        )
        cols.append(c)
    write_snapshot(root, list(records.values()) + fillers, cols, files)
    return records


def paged_analysis(cid: int) -> dict:
    # terms mode (explicit collection ids would select the fillers); the collection is pinned by id
    return {"collection_terms": {"id": cid}, "image_terms": {"map_type": {"in": ["T map", "Z map"]}}}


def test_fault_matrix_end_to_end(tmp_path):
    root = tmp_path / "snapshot"
    records = build_fault_snapshot(root)
    analyses = {
        "faults": {"collection_ids": [PAIN_CID]},
        "paged_dup": paged_analysis(PAGED_DUP),
        "paged_empty": paged_analysis(PAGED_EMPTY),
    }
    with FixtureServer(root) as srv:
        localhost = srv.base.replace("127.0.0.1", "localhost")
        for _, iid, target, kind, times, opts, _, _ in FAULTS:
            if kind is None:
                continue
            rx = record_regex(iid) if target == "record" else media_regex(records[iid])
            opts = {
                k: (v.replace("{localhost}", localhost) if isinstance(v, str) else v) for k, v in opts.items()
            }
            srv.add_fault(rx, kind, times=times, **opts)
        listing_faults = {}
        for _, _, cid, kind, times, opts, _ in LISTING_FAULTS:
            listing_faults[cid] = srv.add_fault(
                rf"^/api/collections/{cid}/images/\?.*offset=1000", kind, times=times, **opts
            )
        # mode overwrite: downloads ask for each record again (in download_new they reuse the record
        # the query's listing returned, and "record" faults would never fire)
        wf = make_workdir(tmp_path, wf_config(srv.url, analyses, mode="overwrite"))
        t0 = time.monotonic()
        run(wf, qc_targets(analyses))
        elapsed = time.monotonic() - t0
        served_requests = list(srv.requests)

    files = assert_clean_results(wf)
    qc = read_qc(wf, "faults").set_index("image_id")
    assert sorted(qc.index) == PAIN  # every selected image has its row, nothing lost or doubled
    assert_map_consistency(wf, PAIN)
    for fault, iid, target, _kind, _times, _, outcome, reason in FAULTS:
        row = qc.loc[iid]
        nv = metadata(wf, iid)["nvmeta"]
        served = (root / media_rel(records[iid])).read_bytes()
        if outcome == "recovered":
            assert nv["status"] == "ok", (fault, nv["reason"])
            assert nv["md5"] == md5_bytes(served), fault
            assert md5_file(image_dir(wf, iid) / "map.nii.gz") == md5_bytes(served), fault
            assert row["status"] == "included", (fault, row["reason"])
            got = "recovered"
        else:
            assert nv["status"] == "failed", fault
            assert row["status"] == "excluded", fault
            assert str(row["reason"]).startswith(reason), (fault, row["reason"])
            # the qc.tsv reason is the download reason, carried through qc.json
            assert row["reason"] == f"download failed: {nv['reason']}"
            assert not (image_dir(wf, iid) / "map.nii.gz").exists()
            got = "excluded"
        # every image ends with the full set of per-image outputs
        assert {p.name for p in image_dir(wf, iid).iterdir()} == (
            {"metadata.json", "zmap.nii.gz", "qc.json"}
            | ({"map.nii.gz", "metadata.cache.json"} if got == "recovered" else set())
        )
        stage = "download (record)" if target == "record" else "download (map)" if target else "-"
        MATRIX.append(
            {
                "fault": fault,
                "stage": stage,
                "outcome": got,
                "reason": None if got == "recovered" else row["reason"],
            }
        )
    # faults really happened (a fault that never fired proves nothing)
    for fault, iid, target, kind, *_ in FAULTS:
        if kind is None:
            continue
        path = record_regex(iid) if target == "record" else media_regex(records[iid])
        n = sum(1 for p in served_requests if re.search(path, p))
        assert n >= 2 or kind in ("status", "html200") and n >= 1, (fault, n)

    for fault, analysis, cid, *_, expected in LISTING_FAULTS:
        assert listing_faults[cid].hits == 1, fault
        sel = pd.read_csv(wf / f"results/analyses/{analysis}/selection.tsv", sep="\t")
        assert sel["image_id"].tolist() == expected, fault  # complete, each image once
        q = read_qc(wf, analysis)
        assert q["image_id"].tolist() == expected
        for iid in expected:
            nv = metadata(wf, iid)["nvmeta"]
            assert nv["status"] == "ok" and nv["md5"] == md5_file(root / media_rel(records[iid]))
        MATRIX.append({"fault": fault, "stage": "query (listing)", "outcome": "recovered", "reason": None})
    print(
        f"\nfault matrix run: {elapsed:.1f} s, {len(served_requests)} requests, {len(files)} files",
        file=sys.__stdout__,
    )


def test_listing_faults_that_persist_fail_the_query_loudly(tmp_path):
    """A listing that stays incomplete (a page always empty; a duplicate that pushes an image out of
    its page) must not become a selection that silently lacks images: the query job fails with the
    reason, the other analyses go on, and a rerun once the server is healthy completes."""
    root = tmp_path / "snapshot"
    build_fault_snapshot(root)
    analyses = {
        "control": {"image_ids": [990001]},
        "paged_dup": paged_analysis(PAGED_DUP),
        "paged_empty": paged_analysis(PAGED_EMPTY),
    }
    targets = [f"results/analyses/{a}/selection.tsv" for a in analyses]
    with FixtureServer(root) as srv:
        srv.add_fault(rf"^/api/collections/{PAGED_DUP}/images/\?.*offset=1000", "duplicate", mode="replace")
        srv.add_fault(rf"^/api/collections/{PAGED_EMPTY}/images/\?.*offset=1000", "empty_page")
        wf = make_workdir(tmp_path, wf_config(srv.url, analyses))
        proc = run(wf, targets, check=False)
        assert proc.returncode != 0
        assert (wf / "results/analyses/control/selection.tsv").exists()  # keep-going: others unaffected
        reasons = {}
        for a, cid in (("paged_dup", PAGED_DUP), ("paged_empty", PAGED_EMPTY)):
            assert not (wf / f"results/analyses/{a}/selection.tsv").exists()
            log = (wf / f"results/logs/query/{a}.log").read_text()
            assert f"collection {cid}: image listing incomplete" in log and "after listing it twice" in log
            reasons[a] = re.findall(rf"ERROR (collection {cid}: image listing incomplete[^;]*)", log)[-1]
        assert "1000 of 1001 records" in reasons["paged_dup"]
        assert "empty page at 1000/1001" in reasons["paged_empty"]
        assert_clean_results(wf)
        # the server recovers: the same command completes, with the full selections
        srv.clear_faults()
        run(wf, targets)
    for a, expected in (("paged_dup", [396069, 990032]), ("paged_empty", [990031])):
        sel = pd.read_csv(wf / f"results/analyses/{a}/selection.tsv", sep="\t")
        assert sel["image_id"].tolist() == expected
    MATRIX.append(
        {
            "fault": "the same image twice across pages, pushing another out, every time",
            "stage": "query (listing)",
            "outcome": "query fails (no partial selection)",
            "reason": reasons["paged_dup"],
        }
    )
    MATRIX.append(
        {
            "fault": "a page of the image list empty before count, every time",
            "stage": "query (listing)",
            "outcome": "query fails (no partial selection)",
            "reason": reasons["paged_empty"],
        }
    )


# ------------------------------------------------------------------------------------------------
# 2. interruption and resume
# ------------------------------------------------------------------------------------------------
def demo_config(url: str) -> dict:
    demo = yaml.safe_load((REPO / "config" / "demo.yaml").read_text())
    demo["neurovault"] = nv_config(url, timeout=5.0)
    return demo


def start(wf: Path, targets, log: Path) -> subprocess.Popen:
    """Start snakemake in its own process group (as a batch system would), output to ``log``."""
    fh = open(log, "ab")  # noqa: SIM115 - closed by the caller via proc.log_fh
    proc = subprocess.Popen(
        snakemake_cmd(targets),
        cwd=wf,
        stdout=fh,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env=dict(os.environ, PYTHONWARNINGS="ignore"),
    )
    proc.log_fh = fh
    return proc


def count(wf: Path, name: str) -> int:
    return sum(1 for _ in (wf / "results" / "images").glob(f"*/{name}")) if (wf / "results").exists() else 0


def kill_when(proc: subprocess.Popen, cond, what: str, timeout: float = 300) -> None:
    """SIGKILL the whole process group as soon as ``cond()`` holds (fails if the run ends first)."""
    t0 = time.monotonic()
    while not cond():
        if proc.poll() is not None:
            raise AssertionError(f"snakemake ended (rc {proc.returncode}) before the kill point: {what}")
        if time.monotonic() - t0 > timeout:
            os.killpg(proc.pid, signal.SIGKILL)
            raise AssertionError(f"kill point never reached: {what}")
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.log_fh.close()


def unlock(wf: Path) -> None:
    """``snakemake --unlock``: a SIGKILL leaves Snakemake's directory lock behind (it cannot tell a
    stale lock from a live run), so resuming after a kill is ``--unlock``, then the same command."""
    subprocess.run(
        [*SNAKEMAKE, "--unlock", "--cores", "1", "--configfile", "test.yaml"],
        cwd=wf,
        check=True,
        capture_output=True,
        env=dict(os.environ, PYTHONWARNINGS="ignore"),
    )


def finish(proc: subprocess.Popen, log: Path, timeout: float = 600) -> None:
    rc = proc.wait(timeout=timeout)
    proc.log_fh.close()
    if rc != 0:
        raise AssertionError(f"snakemake failed ({rc}):\n{log.read_text()[-8000:]}")


def output_digests(wf: Path) -> dict[str, str]:
    """md5 of every output under results/ (logs aside); metadata.json without its fetched_at."""
    out = {}
    for p in sorted((wf / "results").rglob("*")):
        rel = p.relative_to(wf).as_posix()
        if p.is_dir() or rel.startswith("results/logs/"):
            continue
        if p.name in ("metadata.json", "metadata.cache.json"):
            m = json.loads(p.read_text())
            assert m["nvmeta"].pop("fetched_at")
            out[rel] = md5_bytes(json.dumps(m, sort_keys=True).encode())
        else:
            out[rel] = md5_file(p)
    return out


def media_path_of(wf: Path, iid: int) -> str:
    return "/media/" + metadata(wf, iid)["file"].split("/media/", 1)[1]


def test_kill_and_resume_is_byte_identical(tmp_path):
    """SIGKILL the Snakemake process group in the middle of the downloads, then in the middle of the
    per-image conversion; the same command resumes, fetches nothing already complete and ends with
    outputs byte-identical to an uninterrupted run (metadata.json: all but its fetched_at)."""
    with FixtureServer(SNAPSHOT, latency=0.15) as srv:
        config = demo_config(srv.url)
        targets = qc_targets(config["analyses"])
        wf = make_workdir(tmp_path / "killed", config)
        log = tmp_path / "killed.log"

        # run 1: killed in the middle of the downloads
        kill_when(start(wf, targets, log), lambda: count(wf, "metadata.json") >= 3, "3 downloads done")
        temps_1 = assert_outputs_complete(wf)
        done_1 = {int(p.parent.name) for p in (wf / "results/images").glob("*/metadata.json")}
        n_images = len(list(SNAPSHOT.glob("api/images/*.json")))
        assert 3 <= len(done_1) < n_images, done_1

        # run 2 (the same command): resumes; killed in the middle of the conversion
        srv.latency = 0.0
        srv.reset_log()
        zmaps_before = count(wf, "zmap.nii.gz")
        unlock(wf)
        kill_when(
            start(wf, targets, log),
            lambda: count(wf, "zmap.nii.gz") >= zmaps_before + 2 and count(wf, "metadata.json") == n_images,
            "all downloaded and 2 more images converted",
        )
        assert count(wf, "zmap.nii.gz") < n_images, "the conversion had already finished"
        temps_2 = assert_outputs_complete(wf)
        requests_2 = list(srv.requests)
        done_2 = {int(p.parent.name) for p in (wf / "results/images").glob("*/metadata.json")}

        # run 3 (the same command): completes
        srv.reset_log()
        unlock(wf)
        finish(start(wf, targets, log), log)
        requests_3 = list(srv.requests)

        # reference: the same command, uninterrupted, in another directory (same server)
        ref = make_workdir(tmp_path / "reference", config)
        run(ref, targets)

    # nothing already complete was fetched again (no record, no media request)
    for iid in done_1:
        paths = (f"/api/images/{iid}/", media_path_of(wf, iid))
        hits = [p for p in requests_2 + requests_3 if p.startswith(paths)]
        assert not hits, (iid, hits)
    for iid in done_2:
        paths = (f"/api/images/{iid}/", media_path_of(wf, iid))
        assert not [p for p in requests_3 if p.startswith(paths)], iid
    # (rerun 3 may still run a query the kill interrupted: listings only, no image)
    assert not [p for p in requests_3 if p.startswith(("/media/", "/api/images/"))], requests_3
    # the resumed run's outputs are those of an uninterrupted run, byte for byte
    got, want = output_digests(wf), output_digests(ref)
    assert set(got) == set(want)
    assert {k for k in got if got[k] != want[k]} == set()
    assert len([k for k in got if k.endswith("zmap.nii.gz")]) == n_images
    # temporaries left by the kills next to per-image outputs and selections were swept by the rerun
    # (a temporary of a file several jobs share, a cached collection record, may stay: never read)
    left = [t for t in assert_outputs_complete(wf) if not t.startswith("results/collections/")]
    assert not left, left
    print(
        f"\nkill/resume: {len(done_1)} images downloaded before kill 1, {len(done_2)} before kill 2; "
        f"rerun 2 made {len(requests_2)} requests, rerun 3 {len(requests_3)}; temporaries left by "
        f"the kills: {temps_1} / {temps_2}",
        file=sys.__stdout__,
    )


# ------------------------------------------------------------------------------------------------
# 3./4. hostile input: server values never reach a path, sizes bounded, broken maps excluded,
# nothing evaluated as code
# ------------------------------------------------------------------------------------------------
HOSTILE_CID, BIG_JSON_CID = 2000, 2001
INJECT = "{__import__('os').system('touch PWNED_%s')}"
SHELLISH = "$(touch PWNED_shell) `touch PWNED_tick` {wildcards.image_id} {config} %s %(x)s {0}"
# (image id, record changes, map kind, expected qc.tsv reason prefix; None = included)
HOSTILE_RECORDS = [
    (2000001, {"id": "abc"}, "pain", "download failed: image record: server returned a record with id 'abc'"),
    (2000002, {"id": -5}, "pain", "download failed: image record: server returned a record with id '-5'"),
    (2000003, {"file": "../../etc/passwd"}, None, "download failed: unsafe file URL (not http/https)"),
    (2000004, {"file": "file:///etc/passwd"}, None, "download failed: unsafe file URL (not http/https)"),
    (
        2000005,
        {"file": "https://evil.example.org/media/images/2000/x.nii.gz"},
        None,
        "download failed: file URL on a foreign host: 'evil.example.org'",
    ),
    (
        2000006,
        {"file": "https://neurovault.org/media/images/2000/../../../../etc/passwd"},
        None,
        "download failed: unsafe file URL (path traversal)",
    ),
    (
        2000007,
        {"file": "https://neurovault.org/media/images/2000/%2e%2e/%2E%2E/etc/passwd"},
        None,
        "download failed: unsafe file URL (path traversal)",
    ),
    (
        2000008,
        {"file_size": 5_000_000_000},
        "pain",
        "download failed: file too large: 5000000000 bytes (file_size) > max_file_bytes 3000000",
    ),
    (2000009, {"file_size": None}, "noise", "download failed: file too large: "),
]
HOSTILE_LABELS = {
    2000001: "record id is a string ('abc')",
    2000002: "record id is negative (-5)",
    2000003: "file = ../../etc/passwd",
    2000004: "file = file:///etc/passwd",
    2000005: "file URL on a foreign host",
    2000006: "file URL with /../ segments",
    2000007: "file URL with %2e%2e segments",
    2000008: "declared file_size above max_file_bytes",
    2000009: "body larger than max_file_bytes (no file_size)",
}
MAP_LABELS = {
    "all_nan": "map all NaN",
    "all_zero": "map all zero",
    "constant": "map constant (3.0)",
    "non_finite": "map of inf/-inf/NaN only",
    "int16_scaled": "int16 map with scl_slope 0.001",
    "huge": "map with a 1e30 voxel",
    "short_data": "NIfTI header declares more data than the file holds",
    "huge_shape": "NIfTI header claims 30000^3 voxels",
}
HOSTILE_MAPS = [
    (2000101, "all_nan", "no finite data"),
    (2000102, "all_zero", "all zero"),
    (2000103, "constant", "constant map"),
    (2000104, "non_finite", "no finite data"),
    (2000105, "int16_scaled", None),
    (2000106, "huge", "implausible values"),
    (2000107, "short_data", "download failed: NIfTI data shorter than its header declares"),
    (2000108, "huge_shape", "download failed: NIfTI data shorter than its header declares"),
]
INT16_SLOPE = 0.001


def hostile_map_bytes(kind: str, t: np.ndarray, affine: np.ndarray) -> bytes:
    def nii(data, **hdr) -> bytes:
        img = nib.Nifti1Image(data, affine)
        if "slope" in hdr:
            img.header.set_slope_inter(hdr["slope"], 0.0)
        return gzip.compress(img.to_bytes(), mtime=0)

    shape = t.shape
    if kind == "pain":
        return nii(t)
    if kind == "all_nan":
        return nii(np.full(shape, np.nan, np.float32))
    if kind == "all_zero":
        return nii(np.zeros(shape, np.float32))
    if kind == "constant":
        return nii(np.full(shape, 3.0, np.float32))
    if kind == "non_finite":
        d = np.full(shape, np.nan, np.float32)
        d[::2] = np.inf
        d[1::4] = -np.inf
        return nii(d)
    if kind == "int16_scaled":
        q = np.round(np.nan_to_num(t) / INT16_SLOPE).astype(np.int16)
        img = nib.Nifti1Image(q, affine)
        img.header.set_data_dtype(np.int16)
        img.header.set_slope_inter(INT16_SLOPE, 0.0)
        return gzip.compress(img.to_bytes(), mtime=0)
    if kind == "huge":
        d = t.copy()
        d[45, 54, 45] = 1e30
        return nii(d)
    if kind == "short_data":  # header declares 91x109x91 float32, the file holds half of it
        raw = nib.Nifti1Image(t, affine).to_bytes()
        return gzip.compress(raw[: len(raw) // 2], mtime=0)
    if kind == "huge_shape":  # header claims 30000^3 voxels: must not be allocated
        img = nib.Nifti1Image(np.zeros((2, 2, 2), np.float32), affine)
        raw = bytearray(img.to_bytes())
        hdr = nib.Nifti1Header.from_fileobj(__import__("io").BytesIO(bytes(raw[:348])))
        hdr.set_data_shape((30000, 30000, 30000))
        raw[:348] = hdr.binaryblock
        return gzip.compress(bytes(raw), mtime=0)
    if kind == "noise":  # incompressible, larger than max_file_bytes
        d = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
        return gzip.compress(nib.Nifti1Image(d, affine).to_bytes(), compresslevel=1, mtime=0)
    raise ValueError(kind)


def build_hostile_snapshot(root: Path) -> dict:
    pain = bundled_record(990001)
    src = nib.load(SNAPSHOT / media_rel(pain))
    t = np.asarray(src.dataobj, dtype=np.float32)
    col = bundled_collection(PAIN_CID)
    cols = []
    for cid, name in ((HOSTILE_CID, INJECT % "col" + " {config[neurovault]}"), (BIG_JSON_CID, "big json")):
        c = copy.deepcopy(col)
        c.update(id=cid, name=name, url=f"https://neurovault.org/collections/{cid}/", DOI=None)
        cols.append(c)

    def record(iid: int, cid: int, fname: str, **changes) -> dict:
        rec = copy.deepcopy(pain)
        rec.update(
            id=iid,
            collection_id=cid,
            url=f"https://neurovault.org/images/{iid}/",
            collection=f"https://neurovault.org/collections/{cid}/",
            file=f"https://neurovault.org/media/images/{cid}/{fname}",
            name=f"hostile {iid}",
        )
        rec.update(changes)
        return rec

    records, files, served = [], {}, {}
    for iid, changes, kind, _ in HOSTILE_RECORDS:
        rec = record(iid, HOSTILE_CID, f"r{iid}.nii.gz")
        if kind is not None:
            served[iid] = hostile_map_bytes(kind, t, src.affine)
            files[f"media/images/{HOSTILE_CID}/r{iid}.nii.gz"] = served[iid]
            rec["file_size"] = len(served[iid])
        rec.update(changes)
        records.append((iid, rec))
    for iid, kind, _ in HOSTILE_MAPS:
        served[iid] = hostile_map_bytes(kind, t, src.affine)
        files[f"media/images/{HOSTILE_CID}/{kind}.nii.gz"] = served[iid]
        records.append((iid, record(iid, HOSTILE_CID, f"{kind}.nii.gz", file_size=len(served[iid]))))
    # a JSON record larger than max_json_bytes (alone in its collection: listings stay small)
    records.append((2001001, record(2001001, BIG_JSON_CID, "big.nii.gz", description="x" * 300_000)))
    # code-looking strings everywhere a record has text, and in its file name
    weird = "we{ird} name;$(touch PWNED_file).nii.gz"
    served[2000020] = (SNAPSHOT / media_rel(bundled_record(990002))).read_bytes()
    files[f"media/images/{HOSTILE_CID}/{weird}"] = served[2000020]
    records.append(
        (
            2000020,
            record(
                2000020,
                HOSTILE_CID,
                weird,
                name=INJECT % "name",
                contrast_definition=SHELLISH,
                description=INJECT % "desc" + "\n\t{snakemake.input}",
                cognitive_paradigm_cogatlas="{analysis}",
                file_size=len(served[2000020]),
            ),
        )
    )
    root.mkdir(parents=True)
    write_snapshot(root, [], cols, files)
    for iid, rec in records:  # written by hand: some ids are not integers
        (root / "api" / "images" / f"{iid}.json").write_text(json.dumps(rec))
    return {"served": served, "t": t, "affine": src.affine, "weird": weird}


def t_to_z_reference(t: np.ndarray, df: float) -> np.ndarray:
    """Independent t -> z (scipy, in log space for the tails)."""
    from scipy import stats

    return np.sign(t) * stats.norm.isf(np.exp(stats.t.logsf(np.abs(t), df)))


def test_hostile_input_end_to_end(tmp_path):
    root = tmp_path / "snapshot"
    snap = build_hostile_snapshot(root)
    analyses = {
        "records": {"image_ids": [r[0] for r in HOSTILE_RECORDS] + [2001001]},
        "maps": {"image_ids": [m[0] for m in HOSTILE_MAPS]},
        "listing": {"collection_ids": [HOSTILE_CID]},
        # config values that look like code or Snakemake wildcards are data too
        "inject": {
            "collection_terms": {"id": HOSTILE_CID, "name": {"contains": "{__import__('os')"}},
            "image_terms": {
                "name": {"contains": INJECT % "name"},
                "contrast_definition": {"pattern": r".*\{wildcards\.image_id\}.*"},
                "description": {"not_contains": INJECT % "cfg" + " {wildcards.analysis}"},
            },
        },
    }
    with FixtureServer(root) as srv:
        cfg = wf_config(srv.url, analyses, max_file_bytes=3_000_000, max_json_bytes=200_000)
        cfg["conversion"]["df"] = "n-1"
        wf = make_workdir(tmp_path, cfg)
        run(wf, qc_targets(analyses))
        requests = list(srv.requests)

    assert not list(tmp_path.rglob("PWNED*")) and not list(REPO.rglob("PWNED*"))
    assert not list(Path.cwd().glob("PWNED*"))
    assert_clean_results(wf)
    # nothing the server said became a path: results/images/ holds only the ids asked for
    assert {p.name for p in (wf / "results/images").iterdir()} == {
        str(i) for i in [r[0] for r in HOSTILE_RECORDS] + [2001001] + [m[0] for m in HOSTILE_MAPS] + [2000020]
    }
    # refused URLs were never requested
    assert not [p for p in requests if "passwd" in p or "evil" in p or "%2e" in p.lower()]

    qc = read_qc(wf, "records").set_index("image_id")
    for iid, _changes, _, reason in HOSTILE_RECORDS:
        assert str(qc.loc[iid, "reason"]).startswith(reason), (iid, qc.loc[iid, "reason"])
        assert qc.loc[iid, "status"] == "excluded"
        MATRIX.append(
            {
                "fault": HOSTILE_LABELS[iid],
                "stage": "download",
                "outcome": "excluded",
                "reason": qc.loc[iid, "reason"],
            }
        )
    big = qc.loc[2001001, "reason"]
    assert big.startswith("download failed: image record: JSON reply too large") and "200000" in big
    MATRIX.append(
        {
            "fault": "JSON reply larger than max_json_bytes",
            "stage": "query + download",
            "outcome": "excluded",
            "reason": big,
        }
    )
    # the noise map was cut off by its size, not fetched whole
    assert "max_file_bytes 3000000" in qc.loc[2000009, "reason"]
    assert_map_consistency(wf, [r[0] for r in HOSTILE_RECORDS])

    maps = read_qc(wf, "maps").set_index("image_id")
    for iid, kind, reason in HOSTILE_MAPS:
        row = maps.loc[iid]
        if reason is None:
            assert row["status"] == "included", (kind, row["reason"])
        else:
            assert row["status"] == "excluded" and str(row["reason"]).startswith(reason), (
                kind,
                row["reason"],
            )
        z = nib.load(image_dir(wf, iid) / "zmap.nii.gz")
        assert z.shape == (99, 117, 95) and z.get_data_dtype() == np.float32
        if reason is not None:
            assert np.isnan(z.get_fdata()).all()  # an excluded image: all-NaN z-map, outputs complete
        MATRIX.append(
            {
                "fault": MAP_LABELS[kind],
                "stage": "conversion" if not str(reason).startswith("download") else "download",
                "outcome": "included" if reason is None else "excluded",
                "reason": row["reason"],
            }
        )

    # int16 + scl_slope: z from the scaled values, checked voxel by voxel against scipy
    qj = json.loads((image_dir(wf, 2000105) / "qc.json").read_text())
    assert qj["df"] == 24.0 and qj["df_source"] == "n-1"
    zimg = nib.load(image_dir(wf, 2000105) / "zmap.nii.gz")
    z = zimg.get_fdata()
    ijk = np.argwhere(np.isfinite(z))
    src = np.linalg.solve(snap["affine"], zimg.affine) @ np.c_[ijk, np.ones(len(ijk))].T
    src_ijk = np.rint(src[:3]).astype(int)
    assert np.allclose(src[:3], src_ijk, atol=1e-6)  # the grids share a lattice: no interpolation
    tq = np.round(np.nan_to_num(snap["t"]) / INT16_SLOPE).astype(np.int16) * INT16_SLOPE
    t_vals = tq[tuple(src_ijk)]
    assert len(t_vals) > 100_000 and np.abs(t_vals).max() > 3
    np.testing.assert_allclose(z[tuple(ijk.T)], t_to_z_reference(t_vals, 24.0), rtol=1e-4, atol=1e-4)

    # the listing skips records whose id is not a positive integer, and says so
    sel = pd.read_csv(wf / "results/analyses/listing/selection.tsv", sep="\t")
    assert 2000001 not in set(sel["image_id"]) and 2000002 not in set(sel["image_id"])
    qlog = (wf / "results/logs/query/listing.log").read_text()
    assert "listed image with invalid id 'abc' skipped" in qlog and "invalid id -5 skipped" in qlog
    MATRIX.append(
        {
            "fault": "listed record with id 'abc' / -5",
            "stage": "query (listing)",
            "outcome": "skipped, logged",
            "reason": "(query log) listed image with invalid id ... skipped",
        }
    )

    # code-looking strings: selected by literal match, written verbatim, never executed
    sel = pd.read_csv(wf / "results/analyses/inject/selection.tsv", sep="\t", keep_default_na=False)
    assert sel["image_id"].tolist() == [2000020]
    row = sel.iloc[0]
    assert row["name"] == INJECT % "name" and row["contrast_definition"] == SHELLISH
    assert row["description"] == INJECT % "desc" + " {snakemake.input}"  # tab/newline -> one space
    assert row["collection_name"] == INJECT % "col" + " {config[neurovault]}"
    inj = read_qc(wf, "inject")
    assert inj["status"].tolist() == ["included"]
    assert metadata(wf, 2000020)["name"] == INJECT % "name"
    assert md5_file(image_dir(wf, 2000020) / "map.nii.gz") == md5_bytes(snap["served"][2000020])
    assert metadata(wf, 2000020)["nvmeta"]["source_url"].endswith("/media/images/2000/" + snap["weird"])


def test_yaml_config_is_loaded_safely(tmp_path):
    """A Python tag in the config is refused by the YAML loader: nothing runs, no job starts."""
    wf = make_workdir(tmp_path, {"analyses": {"a": {"image_ids": [1]}}})
    (wf / "evil.yaml").write_text(
        "neurovault:\n  url: !!python/object/apply:os.system ['touch PWNED_yaml']\n"
        "analyses:\n  a: {image_ids: [1]}\n"
    )
    proc = subprocess.run(
        [*SNAKEMAKE, "-n", "--cores", "1", "--configfile", "evil.yaml"],
        cwd=wf,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.returncode != 0 and "not valid JSON or YAML" in proc.stdout, proc.stdout[-3000:]
    assert not list(tmp_path.rglob("PWNED*"))
    assert not (wf / "results").exists()


def test_killed_job_temporaries_are_swept(tmp_path):
    """What a SIGKILL leaves next to per-image outputs (atomic_path temporaries, a download work
    directory) is removed by the next attempt of the job that owns them, and nothing else is."""
    from nvmeta.images.download import fetch_image
    from nvmeta.images.template import load_mask
    from nvmeta.images.zmap import make_zmap
    from nvmeta.neurovault import make_client

    d = tmp_path / "results" / "images" / "990001"
    d.mkdir(parents=True)
    stale = [
        d / ".map.nii.gz.k1ll3d0x.part.nii.gz",
        d / ".metadata.json.k1ll3d0x.part.json",
        d / ".zmap.nii.gz.k1ll3d0x.part.nii.gz",
        d / ".qc.json.k1ll3d0x.part.json",
    ]
    for p in stale:
        p.write_bytes(b"\x1f\x8b partial")
    (d / ".map.nii.gz.w0rkd1r0.part").mkdir()
    (d / ".map.nii.gz.w0rkd1r0.part" / "source.nii").write_bytes(b"partial")
    keep = [d / "notes.txt", d / ".map.nii.gz.keep"]
    for p in keep:
        p.write_text("user file")
    client = make_client({**defaults("neurovault"), "url": str(SNAPSHOT)})
    r = fetch_image(client, 990001, d, "download_new", tmp_path / "results" / "collections")
    assert r["status"] == "ok"
    assert sorted(p.name for p in d.iterdir()) == sorted(
        [
            ".map.nii.gz.keep",
            ".qc.json.k1ll3d0x.part.json",
            ".zmap.nii.gz.k1ll3d0x.part.nii.gz",
            "map.nii.gz",
            "metadata.cache.json",
            "metadata.json",
            "notes.txt",
        ]
    )
    qc = make_zmap(
        d / "metadata.json",
        d / "map.nii.gz",
        load_mask("mni152_2mm"),
        {**defaults("conversion"), "df": "n-1"},
        d / "zmap.nii.gz",
        d / "qc.json",
        defaults("qc"),
    )
    assert qc["status"] == "included"
    assert sorted(p.name for p in d.iterdir()) == sorted(
        [
            ".map.nii.gz.keep",
            "map.nii.gz",
            "metadata.cache.json",
            "metadata.json",
            "notes.txt",
            "qc.json",
            "zmap.nii.gz",
        ]
    )
