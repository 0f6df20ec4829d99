"""nvmeta (Snakemake, ``--cores 2``, default outputs) vs the stop-go example's recipe as one Python process.

The baseline is what a user would otherwise run: nilearn's NeuroVault stop-go meta-analysis example,
as one Python process over files already on disk (``RECIPE`` below, written for this benchmark from
the example's description): load each map with ``nilearn.image.load_img``, naive t -> z
(``norm.isf(t.sf(t, df))``, df = n - 1 as the demo's ``conversion.df``; Z maps used as they are),
``new_img_like`` + ``resample_to_img(..., interpolation="linear")`` onto nilearn's MNI152 2 mm brain
mask, ``math_img`` ``np.sum(z_imgs, axis=3) / np.sqrt(z_imgs.shape[3])`` and one ``plot_stat_map``
axial mosaic saved as PNG. Imports and interpreter start-up are included. It runs over exactly the
maps nvmeta included.

**Same work.** The recipe resamples **linearly, as nvmeta does**. nilearn's default,
``interpolation="continuous"`` (a third-order spline), is more work than nvmeta does, and a baseline
that does more work than the thing measured flatters it (BENCHMARKS.md has both). Same maps, same
interpolation, same outputs (z-maps on the template grid, a Stouffer map, a figure).

Two comparisons, both with downloads cached:

- **pain**: the 21 demo pain maps (collection 1425 of the bundled snapshot ``tests/data/snapshot``),
  ``meta: {methods: [stouffer]}`` with every other key at its schema default, no ICA. A first, untimed
  run downloads everything; before each timed run every output except the downloads
  (``results/images/*/metadata*.json`` + the map files) and the query's outputs (``selection.tsv``, ``query_funnel.json``) is deleted
  (template mask, z-maps, qc.json, QC, meta, figures), and ``python -m snakemake --cores 2`` is timed
  (interpreter start-up and DAG building included).
- **synth**: ``--n-images`` (default 400) synthetic maps from ``benchmarks/synth_snapshot.py --n-images 400
  --pool 400`` (generated once into ``--cache``, reused), one analysis over all their collections, the
  same nvmeta set-up; wall time and **peak memory** of both sides.

Peak memory: the sum of the resident set sizes of the whole process tree (Snakemake and its script
jobs; the recipe's one process), sampled every 50 ms with psutil (installed with Snakemake, which depends on it); the peak of the largest single
process is printed as well.

Where nvmeta's time goes: per rule, the sum of its jobs' durations, from the timestamps Snakemake prints
before each job's start and after its end (one-second resolution: sums over many jobs are unbiased,
a single short job reads 0-1 s), and the number of jobs. With 2 cores the per-rule sums add up to about
twice the wall time when both cores are busy.

Usage::

    python benchmarks/bench_vs_recipe.py [--part pain synth] [--n-images 400] [--repeat 1] [--cache DIR]
        [--checkout DIR]

``--checkout DIR``: the workflow and ``nvmeta`` of another tree (an export of an older commit) are
measured instead of this checkout's, against the same recipe.

Run from the repository root with ``PYTHONPATH=.`` (or an editable install); the machine's load is
printed with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synth_snapshot import load_note, make_snapshot, make_workdir, use_checkout  # noqa: E402

from nvmeta.testing.workdir import REPO  # noqa: E402

CUTS = [-15, -8, 6, 30, 46, 62]  # the schema default of meta.cut_coords (the example's)

RECIPE = '''
"""Stop-go recipe as one process: load, naive t->z, linear resample_to_img onto the MNI 2 mm mask, math_img, mosaic."""
import json
import sys

import matplotlib

matplotlib.use("Agg")
from nilearn import datasets, image, plotting
from scipy import stats

items = json.load(open(sys.argv[1]))
out_png = sys.argv[2]


def t_to_z(t_scores, deg_of_freedom):
    return stats.norm.isf(stats.t.sf(t_scores, df=deg_of_freedom))


mask_img = datasets.load_mni152_brain_mask(resolution=2)
z_imgs = []
for item in items:
    img = image.load_img(item["path"])
    if len(img.shape) == 4:
        img = image.index_img(img, 0)
    data = img.get_fdata()
    if item["df"] is not None:
        data = t_to_z(data, deg_of_freedom=item["df"])
    z_img = image.new_img_like(img, data)
    # linear, as nvmeta resamples (nilearn's default, a cubic spline, is more work than nvmeta does)
    z_imgs.append(image.resample_to_img(z_img, mask_img, interpolation="linear", force_resample=True,
                                        copy_header=True))

meta_img = image.math_img("np.sum(z_imgs, axis=3) / np.sqrt(z_imgs.shape[3])", z_imgs=z_imgs)
display = plotting.plot_stat_map(meta_img, display_mode="z", cut_coords=%(cuts)r, threshold=3.0,
                                 title="Stouffer, %%d maps" %% len(z_imgs))
display.savefig(out_png)
display.close()
print(json.dumps({"k": len(z_imgs)}))
'''


# ---------------------------------------------------------------------------------------------
# Measuring


class PeakRSS:
    """Sample the summed RSS of a process and all its descendants every ``interval`` s (psutil)."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        self.pid, self.interval, self.peak, self.single = pid, interval, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import psutil

        try:
            root = psutil.Process(self.pid)
        except psutil.NoSuchProcess:
            return
        while not self._stop.is_set():
            total = 0
            try:
                procs = [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                break
            for p in procs:
                try:
                    rss = p.memory_info().rss
                except psutil.Error:
                    continue
                total += rss
                self.single = max(self.single, rss)
            self.peak = max(self.peak, total)
            self._stop.wait(self.interval)

    def stop(self) -> tuple[int, int]:
        """(peak summed RSS, peak RSS of the largest single process), bytes."""
        self._stop.set()
        self._thread.join()
        return self.peak, self.single


def run_measured(cmd: list[str], cwd: Path) -> tuple[float, int, int, str]:
    """Run ``cmd``; return (wall s, peak summed tree RSS, peak largest-process RSS (bytes), output)."""
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    sampler = PeakRSS(proc.pid)
    out, _ = proc.communicate()
    secs = time.perf_counter() - t0
    peak, single = sampler.stop()
    if proc.returncode != 0:
        raise RuntimeError(f"failed ({proc.returncode}): {' '.join(cmd)}\n{out[-5000:]}")
    return secs, peak, single, out


_STAMP = re.compile(r"^\[(\w{3} \w{3} +\d+ \d\d:\d\d:\d\d \d{4})\]$")


def job_spans(log: str) -> list[tuple[str, datetime, datetime]]:
    """(rule, start, end) of every finished job, from Snakemake's console output (1 s resolution)."""
    started: dict[str, tuple[str, datetime]] = {}
    spans = []
    stamp, rule = None, None
    for line in log.splitlines():
        s = line.strip()
        m = _STAMP.match(s)
        if m:
            stamp = datetime.strptime(m.group(1), "%a %b %d %H:%M:%S %Y")
            continue
        m = re.match(r"^(?:local)?(?:rule|checkpoint) (\w+):$", s)
        if m:
            rule = m.group(1)
            continue
        m = re.match(r"^jobid: (\d+)$", s)
        if m and rule is not None and stamp is not None:
            started[m.group(1)] = (rule, stamp)
            rule = None
            continue
        m = re.match(r"^Finished jobid: (\d+) \(Rule: (\w+)\)$", s)
        if m and m.group(1) in started and stamp is not None:
            r, t0 = started.pop(m.group(1))
            spans.append((r, t0, stamp))
    return spans


def per_rule_times(log: str) -> dict[str, tuple[int, float]]:
    """rule -> (jobs, summed job seconds) from Snakemake's console output (see the module docstring)."""
    totals: dict[str, list] = defaultdict(lambda: [0, 0.0])
    for r, t0, t1 in job_spans(log):
        totals[r][0] += 1
        totals[r][1] += (t1 - t0).total_seconds()
    return {r: (n, s) for r, (n, s) in totals.items() if r != "all"}


# ---------------------------------------------------------------------------------------------
# The two sides


def _snakemake_cmd(cores: int) -> list[str]:
    # the config file last: --configfile takes several values and would swallow targets
    return [sys.executable, "-m", "snakemake", "--cores", str(cores), "--configfile", "bench.yaml"]


def clean_outputs(wf: Path) -> None:
    """Delete every output but the downloads and the query's selections (see the module docstring)."""
    res = wf / "results"
    for d in (res / "images").iterdir():
        meta = json.loads((d / "metadata.json").read_text())
        keep = {"metadata.json", "metadata.cache.json"}
        src = (meta.get("nvmeta") or {}).get("source_format") or ""
        for f in d.iterdir():
            if (
                f.name in keep
                or f.name.startswith("map.")
                or (src and f.name.endswith(src) and "zmap" not in f.name)
            ):
                continue
            f.unlink() if f.is_file() else shutil.rmtree(f)
    shutil.rmtree(res / "template", ignore_errors=True)
    for a in (res / "analyses").iterdir():
        for f in a.iterdir():
            if f.name not in ("selection.tsv", "query_funnel.json"):  # the query's outputs
                f.unlink() if f.is_file() else shutil.rmtree(f)
    shutil.rmtree(res / "logs", ignore_errors=True)


def recipe_items(wf: Path, analysis: str) -> list[dict]:
    """The maps nvmeta included (qc.tsv), as the recipe reads them: downloaded file, df = n - 1 for T maps."""
    import pandas as pd

    qc = pd.read_csv(wf / "results" / "analyses" / analysis / "qc.tsv", sep="\t")
    items = []
    for image_id in qc.loc[qc["status"] == "included", "image_id"].astype(int):
        d = wf / "results" / "images" / str(image_id)
        meta = json.loads((d / "metadata.json").read_text())
        path = next(p for p in sorted(d.iterdir()) if p.name.startswith("map."))
        df = meta["number_of_subjects"] - 1 if meta["map_type"] == "T map" else None
        items.append({"id": image_id, "path": str(path), "df": df})
    return items


def compare(label: str, wf: Path, analysis: str, tmp: Path, repeat: int, cores: int) -> dict:
    """Time nvmeta and the recipe side by side (alternating order), print and return the medians."""
    t_first, *_ = run_measured(_snakemake_cmd(cores), wf)
    items = recipe_items(wf, analysis)
    (tmp / f"{label}_items.json").write_text(json.dumps(items))
    (tmp / "recipe.py").write_text(RECIPE % {"cuts": CUTS})
    print(
        f"[{label}] {len(items)} included maps; first (downloading) nvmeta run {t_first:.1f} s; {load_note()}"
    )
    runs: dict[str, list[tuple[float, int, int]]] = {"nvmeta": [], "recipe": []}
    breakdown = None
    for r in range(repeat):
        for which in ("nvmeta", "recipe") if r % 2 == 0 else ("recipe", "nvmeta"):
            if which == "nvmeta":
                clean_outputs(wf)
                secs, peak, single, out = run_measured(_snakemake_cmd(cores), wf)
                breakdown = per_rule_times(out)
                n_jobs = sum(n for n, _ in breakdown.values())
                extra = f"{n_jobs} jobs"
            else:
                secs, peak, single, out = run_measured(
                    [
                        sys.executable,
                        str(tmp / "recipe.py"),
                        str(tmp / f"{label}_items.json"),
                        str(tmp / f"{label}_recipe.png"),
                    ],
                    tmp,
                )
                extra = f"{json.loads(out.strip().splitlines()[-1])['k']} maps"
            runs[which].append((secs, peak, single))
            print(
                f"  run {r + 1} {which:6s} {secs:7.1f} s  peak RSS {peak / 2**20:7.0f} MB (tree), "
                f"{single / 2**20:6.0f} MB (largest process)  ({extra}; {load_note()})",
                flush=True,
            )
    med = {w: tuple(statistics.median(x[i] for x in v) for i in range(3)) for w, v in runs.items()}
    (a, pa, _), (b, pb, _) = med["nvmeta"], med["recipe"]
    print(
        f"[{label}] nvmeta snakemake --cores {cores} {a:.1f} s vs recipe (linear resampling, as nvmeta) "
        f"{b:.1f} s: wall ratio nvmeta/recipe "
        f"**{a / b:.2f}×**; peak memory {pa / 2**20:.0f} MB vs {pb / 2**20:.0f} MB: ratio **{pa / pb:.2f}×**; {load_note()}"
    )
    if breakdown:
        print(
            f"[{label}] where nvmeta's time went (last run; summed job seconds per rule, from Snakemake's log):"
        )
        for rule, (n, s) in sorted(breakdown.items(), key=lambda kv: -kv[1][1]):
            per = f" ({s / n:.2f} s/job)" if n > 1 else ""
            print(f"    {rule:22s} {n:5d} job{'s' if n != 1 else ' '} {s:7.0f} s{per}")
    return {"nvmeta": med["nvmeta"], "recipe": med["recipe"], "breakdown": breakdown}


def pain(tmp: Path, repeat: int, cores: int) -> dict:
    wf = make_workdir(
        tmp / "pain",
        {
            "neurovault": {"url": str(REPO / "tests" / "data" / "snapshot"), "mode": "download_new"},
            "template": {"mask": "mni152_2mm"},
            "conversion": {"df": "n-1"},
            "analyses": {"pain": {"collection_ids": [1425], "meta": {"methods": ["stouffer"]}}},
        },
    )
    return compare("pain-21", wf, "pain", tmp, repeat, cores)


def cached_snapshot(cache: Path, n_images: int) -> tuple[Path, list[int]]:
    """``synth_snapshot.py --n-images N --pool N`` under ``cache`` (written once): (root, collection ids)."""
    snap = cache / f"synth_{n_images}_pool{n_images}"
    marker = snap / "collection_ids.json"  # written last: the snapshot is complete
    if not marker.exists():
        shutil.rmtree(snap, ignore_errors=True)
        cache.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        made = make_snapshot(snap, n_images, pool=n_images, seed=0, log=lambda *a: None)
        marker.write_text(json.dumps(sorted(made["collection_ids"])))
        print(f"[synth] snapshot of {n_images} maps written to {snap} in {time.perf_counter() - t0:.0f} s")
    return snap, json.loads(marker.read_text())


def synth_config(url: str, cids: list[int], methods: tuple[str, ...] = ("stouffer",)) -> dict:
    """One analysis over every collection of a synthetic snapshot (as :func:`synth` runs it)."""
    return {
        "neurovault": {"url": url, "mode": "download_new"},
        "template": {"mask": "mni152_2mm"},
        "conversion": {"df": "n-1"},
        "analyses": {"synth": {"collection_ids": cids, "meta": {"methods": list(methods)}}},
    }


def synth(tmp: Path, cache: Path, n_images: int, repeat: int, cores: int) -> dict:
    snap, cids = cached_snapshot(cache, n_images)
    wf = make_workdir(tmp / "synth", synth_config(str(snap), cids))
    return compare(f"synth-{n_images}", wf, "synth", tmp, repeat, cores)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--part", nargs="+", choices=["pain", "synth"], default=["pain", "synth"])
    p.add_argument("--n-images", type=int, default=400)
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--cores", type=int, default=2)
    p.add_argument(
        "--cache",
        type=Path,
        default=Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "nvmeta-bench",
        help="where the synthetic snapshot is generated once and reused",
    )
    p.add_argument("--workdir", type=Path, default=None, help="parent of the temporary workflow copies")
    p.add_argument(
        "--checkout", type=Path, default=None, help="benchmark the workflow and nvmeta of this tree instead"
    )
    args = p.parse_args()
    use_checkout(args.checkout)
    print(f"bench_vs_recipe: {' '.join(sys.argv[1:]) or '(defaults)'}; {load_note()}")
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        tmp = Path(tmp)
        if "pain" in args.part:
            pain(tmp, args.repeat, args.cores)
        if "synth" in args.part:
            args.cache.mkdir(parents=True, exist_ok=True)
            synth(tmp, args.cache, args.n_images, args.repeat, args.cores)


if __name__ == "__main__":
    main()
