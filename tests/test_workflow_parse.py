"""Reading the workflow (a dry run, --lint) changes nothing: no file on disk, no process-wide state.

Snakemake reads the Snakefile for every command, -n, --lint and --report included, and once more
in every job it spawns; what the workflow does at that point must be side-effect free.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from helpers import SNAPSHOT, make_workdir

pytestmark = pytest.mark.e2e

# In a fresh interpreter: the state a Snakefile could change, before and after Snakemake's own
# entry point (the `snakemake` command) reads the workflow for each command.
PROBE = """
import gc, json, signal, sys, threading
from snakemake.cli import main

def state():
    return [list(gc.get_threshold()), gc.get_freeze_count(), sys.excepthook is sys.__excepthook__,
            signal.getsignal(signal.SIGINT) is signal.default_int_handler]

before, codes = state(), []
for args in (["-n"], ["--lint"]):
    try:
        main([*args, "--cores", "1", "--configfile", "test.yaml"])
    except SystemExit as exc:
        codes.append(exc.code)
print(json.dumps({"before": before, "after": state(), "codes": codes}))
"""


def test_dry_run_and_lint_change_no_file_and_no_process_state(tmp_path):
    """With an unreadable selection on disk (an id written as a float): --lint passes, the dry run
    stops with the fix, and both leave the file byte for byte and the interpreter as they found it
    (garbage collector thresholds and freeze, excepthook, SIGINT handler)."""
    cfg = {
        "neurovault": {"url": "tests/data/snapshot"},
        "analyses": {"A": {"image_ids": [990001, 990002], "meta": {"methods": ["stouffer"]}}},
    }
    wf = make_workdir(tmp_path, cfg, snapshot=SNAPSHOT)
    sel = wf / "results/analyses/A/selection.tsv"
    sel.parent.mkdir(parents=True)
    sel.write_bytes(b"image_id\tcollection_id\n990001.0\t1425\n990002\t1425\n")
    (sel.parent / "query_funnel.json").write_text("{}\n")
    files_before = {p: p.read_bytes() for p in (wf / "results").rglob("*") if p.is_file()}
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=wf, capture_output=True, text=True, env=env, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["codes"] == [1, 0], proc.stderr[-3000:]
    assert result["after"] == result["before"] == [list(result["before"][0]), 0, True, True]
    output = proc.stdout + proc.stderr
    assert "results/analyses/A/selection.tsv is unreadable" in output, output[-3000:]
    assert "--forcerun results/analyses/A/selection.tsv" in output
    files_after = {p: p.read_bytes() for p in (wf / "results").rglob("*") if p.is_file()}
    assert files_after == files_before
