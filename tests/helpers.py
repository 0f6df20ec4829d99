"""Shared helpers for end-to-end tests: a throw-away copy of the workflow and a snakemake runner."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

from nvmeta.testing.workdir import REPO, copy_workflow

SNAPSHOT = REPO / "tests" / "data" / "snapshot"
SNAKEMAKE = [sys.executable, "-m", "snakemake"]


def make_workdir(tmp: Path, config: dict, snapshot: Path | None = None) -> Path:
    """Copy the workflow into ``tmp/wf`` with ``config`` as ``test.yaml`` (and the snapshot linked in)."""
    wf = copy_workflow(tmp / "wf", config, "test.yaml")
    if snapshot is not None:
        (wf / "tests" / "data").mkdir(parents=True, exist_ok=True)
        os.symlink(snapshot, wf / "tests" / "data" / "snapshot")
    return wf


def once_per_log_block(out: str) -> str:
    """Snakemake's output with each failed job's log block kept once: before 9.26 Snakemake prints
    every such block twice (``Logfile <path>:`` between two ``=`` fences)."""
    import re

    seen = set()

    def first(match: re.Match) -> str:
        if match.group(0) in seen:
            return ""
        seen.add(match.group(0))
        return match.group(0)

    return re.sub(r"Logfile [^\n]*:\n=+\n.*?\n=+\n", first, out, flags=re.S)


def run_snakemake(
    wf: Path, *args: str, configfile: str = "test.yaml", check: bool = True, timeout: float = 1500
):
    """Run snakemake in ``wf``; return the CompletedProcess (stdout+stderr merged in .stdout)."""
    cmd = [*SNAKEMAKE, "--cores", "2", "--configfile", configfile, *args]
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.run(
        cmd, cwd=wf, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout, env=env
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake failed ({proc.returncode}):\n{proc.stdout[-6000:]}")
    return proc


def selection(cfg: dict | None = None, **replace) -> dict:
    """What the query reads of an analysis block ``cfg`` given in part: completed from the schema's
    defaults, then :func:`nvmeta.select.spec.analysis_selection` (a null ``max_images`` becomes the
    mode's cap); ``replace`` sets keys of the result (``max_images=None``: no limit, also with terms)."""
    from nvmeta.select.spec import analysis_selection
    from nvmeta.workflow.config import defaults

    return {**analysis_selection({**defaults("analysis"), **(cfg or {})}), **replace}


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _without_timings(obj):
    """A JSON value without run-time measurements (keys naming seconds, times, dates)."""
    if isinstance(obj, dict):
        return {
            k: _without_timings(v)
            for k, v in obj.items()
            if not any(word in k.lower() for word in ("seconds", "elapsed", "time", "_at", "date"))
        }
    if isinstance(obj, list):
        return [_without_timings(v) for v in obj]
    return obj


def compared_files(wf: Path) -> dict[str, str]:
    """md5 of every deterministic result file: tables, downloaded and z-maps, per-image QC,
    meta-analysis maps and figures.

    JSON files are compared without their timing keys (a job's run time differs between runs);
    left out: logs and metadata.json (the server's record plus the download time)."""
    results = wf / "results"
    out = {}
    for path in sorted(results.rglob("*")):
        rel = path.relative_to(results).as_posix()
        if not path.is_file() or rel.startswith("logs/") or path.name == "metadata.json":
            continue
        if path.suffix == ".json":
            obj = _without_timings(json.loads(path.read_text()))
            out[rel] = hashlib.md5(json.dumps(obj, sort_keys=True).encode()).hexdigest()
        elif path.suffix in (".tsv", ".png") or path.name.endswith(".nii.gz"):
            out[rel] = md5(path)
    return out
