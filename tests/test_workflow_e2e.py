"""End-to-end: snakemake on a temp copy of the workflow, against the bundled snapshot directory
and against the fixture HTTP server serving the same snapshot."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import yaml
from helpers import REPO, SNAPSHOT, make_workdir, run_snakemake

pytestmark = pytest.mark.e2e

DEMO = yaml.safe_load((REPO / "config" / "demo.yaml").read_text())
PAIN_IDS = list(range(990001, 990023))


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def served_file(image_id: int) -> Path:
    rec = json.loads((SNAPSHOT / "api" / "images" / f"{image_id}.json").read_text())
    return SNAPSHOT / "media" / rec["file"].split("/media/", 1)[1]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """The demo config, run once against the snapshot directory."""
    wf = make_workdir(tmp_path_factory.mktemp("demo"), DEMO, snapshot=SNAPSHOT)
    proc = run_snakemake(wf)
    return wf, proc


def qc_table(wf: Path, analysis: str) -> pd.DataFrame:
    return pd.read_csv(wf / f"results/analyses/{analysis}/qc.tsv", sep="\t")


def test_demo_selection(demo_run):
    wf, _ = demo_run
    sel = pd.read_csv(wf / "results/analyses/pain/selection.tsv", sep="\t")
    assert sel["image_id"].tolist() == PAIN_IDS
    for col in (
        "image_id collection_id name map_type image_type analysis_level number_of_subjects "
        "statistic_parameters modality contrast_definition cognitive_paradigm_cogatlas file modify_date"
    ).split():
        assert col in sel.columns, col
    assert (sel["collection_id"] == 1425).all()
    assert sel["number_of_subjects"].iloc[:21].tolist() == [
        25,
        25,
        20,
        20,
        9,
        9,
        9,
        12,
        12,
        12,
        12,
        13,
        32,
        24,
        14,
        14,
        12,
        12,
        16,
        16,
        16,
    ]
    edge = pd.read_csv(wf / "results/analyses/edge/selection.tsv", sep="\t")
    assert edge["image_id"].tolist() == [396069, 990031, 990032, 990033, 990034, 10426]


def test_demo_downloads_are_the_served_bytes(demo_run):
    wf, _ = demo_run
    for image_id in PAIN_IDS[:21] + [396069, 990031, 990032, 990034, 10426]:
        d = wf / "results/images" / str(image_id)
        meta = json.loads((d / "metadata.json").read_text())
        assert meta["nvmeta"]["status"] == "ok", (image_id, meta["nvmeta"])
        assert md5(d / "map.nii.gz") == md5(served_file(image_id)), image_id
        assert meta["nvmeta"]["md5"] == md5(served_file(image_id))
    # The Analyze pair is stored as .nii.gz with the same data.
    d = wf / "results/images/990033"
    img = nib.load(d / "map.nii.gz")
    ref = nib.load(SNAPSHOT / "media/images/1617/box_0b_vs_1b.hdr")
    np.testing.assert_array_equal(np.asanyarray(img.dataobj), np.asanyarray(ref.dataobj))
    np.testing.assert_allclose(img.affine, ref.affine)


def test_demo_truncated_gzip_is_a_status_not_a_crash(demo_run):
    wf, _ = demo_run
    d = wf / "results/images/990022"
    meta = json.loads((d / "metadata.json").read_text())
    assert meta["nvmeta"]["status"] == "failed"
    assert "gzip" in meta["nvmeta"]["reason"].lower() or "corrupt" in meta["nvmeta"]["reason"].lower()
    assert not (d / "map.nii.gz").exists()
    assert not list(d.glob("*.part*")), "partial file left behind"
    qc = qc_table(wf, "pain").set_index("image_id")
    assert qc.loc[990022, "status"] == "excluded"
    assert qc.loc[990022, "reason"].startswith("download failed")


def test_demo_edge_cases_carried_as_statuses(demo_run):
    wf, _ = demo_run
    qc = qc_table(wf, "edge").set_index("image_id")
    assert qc.loc[990032, "status"] == "excluded" and qc.loc[990032, "reason"].startswith(
        "too many volumes: 2"
    )
    assert qc.loc[990034, "status"] == "excluded" and "map type" in qc.loc[990034, "reason"]
    assert qc.loc[10426, "status"] == "excluded" and qc.loc[10426, "reason"] == "missing sample size"
    assert qc.loc[990033, "df"] == 14 and qc.loc[990033, "df_source"] == "statistic_parameters"
    assert qc.loc[396069, "df_source"] == "z map"


def test_demo_pain_all_included_with_df(demo_run):
    wf, _ = demo_run
    qc = qc_table(wf, "pain").set_index("image_id")
    inc = qc[qc["status"] == "included"]
    assert sorted(inc.index) == PAIN_IDS[:21]
    assert (inc["df"] == inc["number_of_subjects"] - 1).all()
    assert (inc["df_source"] == "n-1").all()
    funnel = pd.read_csv(wf / "results/analyses/pain/funnel.tsv", sep="\t")
    assert funnel["count"].tolist()[0] == 22 and funnel["count"].tolist()[-1] == 21


def test_in_process_qc_and_overview_log_to_their_file_and_the_terminal(demo_run):
    """QC and overview run in threads of the Snakemake process (nvmeta/workflow/jobs.py), beside other
    analyses' jobs: each job's records reach its own log file and, as a script job's do, the
    terminal once; nothing of another job lands in its log."""
    wf, proc = demo_run
    for analysis, n_sel, n_inc in (("pain", 22, 21),):
        line = f"QC: {n_sel} selected, {n_inc} included"
        qc_log = (wf / f"results/logs/qc/{analysis}.log").read_text().splitlines()
        assert [x for x in qc_log if line in x] and all(" INFO " in x or " WARNING " in x for x in qc_log)
        assert not [x for x in qc_log if "image " in x and ("included" in x or "excluded" in x)]  # zmap lines
        assert proc.stdout.count(line) == 1
    for analysis in DEMO["analyses"]:
        text = (wf / f"results/logs/report/{analysis}_overview.log").read_text()
        assert f"overview of {analysis} written" in text
        assert text.count(" INFO ") == 1, text
        assert proc.stdout.count(f"overview of {analysis} written") == 1


def test_demo_fan_in_outputs_exist(demo_run):
    wf, _ = demo_run
    a = wf / "results/analyses/pain"
    for method in DEMO["analyses"]["pain"]["meta"]["methods"]:
        for name in ("z.nii.gz", "p.nii.gz", "k.nii.gz", "z_fdr.nii.gz", "clusters.tsv", "z.png"):
            assert (a / "meta" / method / name).stat().st_size > 0, (method, name)
    assert (a / "meta/sensitivity.tsv").exists()
    assert (a / "figures/inputs_glass_brain.png").stat().st_size > 10_000
    for name in ("components.nii.gz", "mixing.tsv", "terms.tsv", "stability.tsv"):
        assert (a / "ica" / name).exists(), name
    assert len(list((a / "ica").glob("component_*.png"))) == DEMO["analyses"]["pain"]["ica"]["n_components"]
    tz = wf / "results/analyses/tz/ica"
    assert len(list(tz.glob("component_*.png"))) == DEMO["analyses"]["tz"]["ica"]["n_components"]


def test_dry_run_of_default_config_needs_no_network(tmp_path, monkeypatch):
    """`snakemake -n` on config/config.yaml builds its DAG offline: the query is a checkpoint."""
    cfg = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    wf = make_workdir(tmp_path, cfg)
    for var in ("HTTPS_PROXY", "HTTP_PROXY"):  # any request would fail at once
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    proc = run_snakemake(wf, "-n")
    assert "checkpoint query" in proc.stdout
    for analysis in ("stopgo", "ica"):
        assert f"results/analyses/{analysis}/selection.tsv" in proc.stdout
    assert not (wf / "results").exists()


def test_connections_to_the_server_are_bounded(tmp_path):
    """neurovault.max_connections bounds concurrent requests across parallel jobs."""
    from nvmeta.testing.server import FixtureServer

    with FixtureServer(SNAPSHOT, latency=0.05) as srv:
        cfg = {
            "neurovault": {"url": srv.url, "max_connections": 1, "retries": 1, "backoff": 0.0},
            "analyses": {
                "a": {"image_ids": PAIN_IDS[:4]},
                "b": {"image_ids": PAIN_IDS[4:8]},
            },
        }
        wf = make_workdir(tmp_path, cfg)
        proc = run_snakemake(wf, "--cores", "4", "results/analyses/a/qc.tsv", "results/analyses/b/qc.tsv")
        assert proc.returncode == 0
        assert len(list((wf / "results/images").glob("*/map.nii.gz"))) == 8
        assert srv.max_in_flight == 1, srv.max_in_flight


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_server_error_is_in_each_failing_jobs_log(tmp_path):
    """NeuroVault unreachable: each failing query job's log holds the error, and the terminal
    carries it once per job (inside that job's log block), with no traceback anywhere."""
    from conftest import fast_config

    url = f"http://127.0.0.1:{_closed_port()}/api/"
    cfg = {
        "neurovault": fast_config(url, retries=0, timeout=1.0),
        "analyses": {"a": {"collection_ids": [1425]}, "b": {"collection_ids": [1616]}},
    }
    wf = make_workdir(tmp_path, cfg)
    proc = run_snakemake(wf, check=False)
    assert proc.returncode != 0
    for name in ("a", "b"):
        log = (wf / f"results/logs/query/{name}.log").read_text()
        assert "ERROR" in log and "refused" in log and "Traceback" not in log, log
    assert "Traceback" not in proc.stdout, proc.stdout[-4000:]
    # Each job's error once in each log block Snakemake prints for it (before 9.26 Snakemake
    # prints each failed job's block twice).
    block = r"Logfile ([^\n]*):\n=+\n(.*?)\n=+\n"
    blocks = re.findall(block, proc.stdout, flags=re.S)
    assert {path for path, _ in blocks} == {f"results/logs/query/{name}.log" for name in ("a", "b")}
    message = "connection failed (connection refused)"
    assert all(text.count(message) == 1 for _, text in blocks), blocks


def readme_outputs() -> list[re.Pattern]:
    """Path patterns of README's Outputs table (``{x}`` = one path segment; bare names share the
    folder of the first path in their cell; a path ending in ``/`` covers everything below)."""
    text = (REPO / "README.md").read_text().split("## Outputs", 1)[1].split("\n## ", 1)[0]
    patterns = []
    for row in re.findall(r"^\| (`results/[^|]*) \|", text, re.M):
        names = re.findall(r"`([^`]+)`", row)
        folder = names[0].rsplit("/", 1)[0]
        for name in names:
            path = name if name.startswith("results/") else f"{folder}/{name}"
            rx = re.escape(path).replace(r"\{", "{").replace(r"\}", "}")
            rx = re.sub(r"\{[a-z_]+\}", "[^/]+", rx)
            patterns.append(re.compile(rx + (".*" if path.endswith("/") else "")))
    return patterns


def test_readme_outputs_table_lists_every_output_and_only_those(demo_run):
    wf, _ = demo_run
    files = sorted(str(p.relative_to(wf)) for p in (wf / "results").rglob("*") if p.is_file())
    patterns = readme_outputs()
    assert len(patterns) > 20
    unlisted = [f for f in files if not any(p.fullmatch(f) for p in patterns)]
    assert not unlisted, f"written by the demo but not in README's Outputs table: {unlisted}"
    unused = [p.pattern for p in patterns if not any(p.fullmatch(f) for f in files)]
    assert not unused, f"in README's Outputs table but not written by the demo: {unused}"


def _readable(path: Path) -> None:
    """Raise unless ``path`` is a complete output: every byte of a NIfTI, a whole PNG, a table."""
    if path.name.endswith(".nii.gz"):
        np.asarray(nib.load(path).dataobj)
    elif path.suffix == ".png":
        assert path.read_bytes().endswith(b"IEND\xaeB`\x82"), path
    elif path.suffix == ".tsv":
        pd.read_csv(path, sep="\t")
    elif path.suffix == ".json":
        json.loads(path.read_text())


def test_ctrl_c_stops_the_run_keeps_outputs_consistent_and_the_same_command_resumes(tmp_path):
    """SIGINT to the whole process group (what Ctrl-C in a terminal does) while two script jobs
    run: Snakemake stops (exit code not 0, no job of the run's process group left, the lock
    released, the jobs that depend on the interrupted ones never started), every output on disk is
    complete (no partial file at an output path), and the same command then finishes the run with
    the outputs of an uninterrupted run of the same config, byte for byte.

    What Snakemake prints meanwhile is its own and not checked: a process that receives SIGINT
    while the garbage collector runs during an import can raise the KeyboardInterrupt inside
    importlib's weakref callback, where CPython prints "Exception ignored in: <function
    _get_module_lock.<locals>.cb>" and drops it; that process then goes on (a job runs to its end,
    Snakemake waits for it), which none of the checks depend on."""
    import os
    import signal
    import subprocess
    import time

    from helpers import SNAKEMAKE, compared_files

    cfg = {
        "neurovault": {"url": "tests/data/snapshot"},
        "conversion": {"df": "n-1"},
        "analyses": {"A": {"image_ids": PAIN_IDS[:3], "meta": {"methods": ["stouffer"]}}},
    }
    wf = make_workdir(tmp_path / "interrupted", cfg, snapshot=SNAPSHOT)
    figures_log = wf / "results/logs/figures/A_inputs.log"  # created when the job's logging is set up
    meta_log = wf / "results/logs/meta/A_stouffer.log"
    with open(tmp_path / "out.txt", "w") as out:
        proc = subprocess.Popen(
            [*SNAKEMAKE, "--cores", "2", "--configfile", "test.yaml"],
            cwd=wf,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, as a terminal's foreground job
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        try:
            deadline = time.monotonic() + 600
            while (
                not (figures_log.exists() and meta_log.exists())
                and proc.poll() is None
                and time.monotonic() < deadline
            ):
                time.sleep(0.05)
            assert proc.poll() is None, "the run ended before both script jobs started"
            os.killpg(proc.pid, signal.SIGINT)
            rc = proc.wait(timeout=300)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    text = (tmp_path / "out.txt").read_text()
    assert rc != 0, text[-3000:]
    with pytest.raises(ProcessLookupError):  # nothing of the run is still running or writing
        os.killpg(proc.pid, 0)
    assert not list((wf / ".snakemake" / "locks").glob("*"))
    assert not (wf / "results/analyses/A/overview.html").exists(), "the run went on after Ctrl-C"
    for path in (wf / "results").rglob("*"):
        if path.is_file() and not path.name.startswith(".") and "logs" not in path.parts:
            _readable(path)

    again = run_snakemake(wf)
    assert "input_figures" in again.stdout
    assert "Nothing to be done" in run_snakemake(wf, "-n").stdout
    assert not [p for p in (wf / "results").rglob(".*") if p.is_file()], "temporaries left"
    reference = make_workdir(tmp_path / "reference", cfg, snapshot=SNAPSHOT)
    run_snakemake(reference)
    expected, resumed = compared_files(reference), compared_files(wf)
    assert "analyses/A/figures/inputs_glass_brain.png" in expected
    assert "analyses/A/meta/stouffer/z.nii.gz" in expected
    assert (wf / "results/analyses/A/overview.html").stat().st_size > 0
    assert resumed == expected, sorted(k for k in expected if expected[k] != resumed.get(k))


def test_permutation_job_declares_the_memory_and_time_its_estimator_needs(tmp_path):
    """The permutation job's mem_mb is the estimate with which the method refuses to start
    (nvmeta.meta.estimators.permutation_memory_bytes, for the mask's voxels and the analysis'
    n_perm), which tests/test_meta.py checks against tracemalloc's peak; its runtime is
    permutation_runtime_minutes for the same maps, mask and n_perm (checked against the measured
    rate in tests/test_meta.py). n_perm 100,000 on 3 maps declares 12 minutes, the default 1,000
    would declare 11: the rule reads the analysis' n_perm."""
    from nvmeta.images.template import load_mask
    from nvmeta.meta.budget import permutation_memory_bytes, permutation_runtime_minutes

    cfg = {
        "neurovault": {"url": "tests/data/snapshot"},
        "conversion": {"df": "n-1"},
        "analyses": {
            "A": {
                "image_ids": PAIN_IDS[:3],
                "meta": {"methods": ["permutation", "stouffer"], "n_perm": 100_000},
            }
        },
    }
    wf = make_workdir(tmp_path, cfg, snapshot=SNAPSHOT)
    # (--cores first: --configfile takes several values and would swallow the targets)
    run_snakemake(wf, "--cores", "2", "results/analyses/A/qc.tsv")
    targets = [f"results/analyses/A/meta/{m}/z.nii.gz" for m in ("permutation", "stouffer")]
    proc = run_snakemake(wf, "--cores", "2", "-n", *targets)
    declared, minutes = {}, {}
    for block in re.split(r"\n(?=rule )", proc.stdout):
        m = re.match(r"rule (\w+):", block)
        wc = re.search(r"wildcards: .*method=(\w+)", block)
        mem = re.search(r"mem_mb=(\d+)", block)
        runtime = re.search(r"runtime=(\d+)", block)
        if m and m.group(1) == "meta" and wc and mem and runtime:
            declared[wc.group(1)] = int(mem.group(1))
            minutes[wc.group(1)] = int(runtime.group(1))
    voxels = int(np.count_nonzero(np.asarray(load_mask(str(wf / "results/template/mask.nii.gz")).dataobj)))
    assert voxels > 100_000
    assert declared == {
        "permutation": 2000 + permutation_memory_bytes(3, voxels, 100_000) // 2**20,
        "stouffer": 2000,
    }, proc.stdout[-3000:]
    # flat in the number of maps: 20,000 maps on this mask declare less than 3.4 GB
    assert 2000 + permutation_memory_bytes(20000, voxels, 1000) // 2**20 < 3400
    assert minutes == {"permutation": permutation_runtime_minutes(3, voxels, 100_000), "stouffer": 10}, (
        proc.stdout
    )
    assert minutes["permutation"] == 12 > permutation_runtime_minutes(3, voxels, 1000)
