"""DAG building at 1k-50k selected images (``snakemake -n``), where its time goes, and fan-in peak memory.

Part 1, DAG (``--sizes 1000 10000``; BENCHMARKS.md row 4 also has 20000 and 50000). For each size N:

1. a synthetic snapshot of N images (``benchmarks/synth_snapshot.py``, 50 distinct files hard-linked);
2. a fresh copy of the workflow whose config has one analysis selecting every group T/Z map by terms
   (``image_terms``, ``max_images: N``) with ``meta: {methods: [stouffer]}`` and ``ica: {}``, the
   ``neurovault.url`` being the snapshot directory;
3. the query runs for real once (``snakemake --cores 2 results/analyses/bench/selection.tsv``), so the
   checkpoint output exists;
4. timed: ``snakemake -n --cores 2`` for the full default target (rule ``all``: 2N per-image jobs, the QC,
   meta (stouffer) and ICA fan-ins), peak RSS of that process from ``RUSAGE_CHILDREN``; the time is the
   whole process, start-up and exit included; then the same with ``-q`` (Snakemake builds the same DAG
   and stops there, without listing and dry-"running" every job: the cost of the DAG alone);
5. baseline, side by side: a bare Snakefile with the same DAG shape (N download, N zmap jobs, the same
   fan-ins with N-file inputs, ids listed directly, no checkpoint, no config validation, CPython's
   default garbage collector settings, as nvmeta's): what
   Snakemake itself costs for this many jobs;
6. ``--profile``: the nvmeta dry run again under ``cProfile``; the top functions by cumulative and own time.

Disk and time: the snapshot is ~5.5 kB per image (50,000: 270 MB, written in 10-15 s), the workflow copy
with the query's records ~4.5 kB per image; the query took 6 s at 10,000, 7 s at 20,000 and 15 s at
50,000 images (load 1-2), the three dry runs at 50,000 about 4 min together, 2.2 GB of memory each.
``--sizes 10000 20000 50000`` takes ~12 min and ~1 GB of disk under ``--workdir`` (deleted at the end).

Part 2, fan-in memory (``--fanin 1000 10000``): :func:`nvmeta.meta.run_method` (stouffer, the rule's code
path) in a fresh subprocess over N included template-grid z-maps (``qc.tsv`` written here; 40 distinct
float32 z-maps on the MNI152 2 mm mask grid, image ``i`` reading map ``i % 40``: see ``_make_zpool``), peak RSS from
``ru_maxrss``. Baseline: what NiMARE's / the nilearn example's in-memory approach holds, a maps x voxels
stack (float64, masked), measured at N <= ``--baseline-max`` (default 1000) and otherwise given as its size.

Usage::

    python benchmarks/bench_dag.py --sizes 1000 10000 --profile --fanin 1000 10000
    python benchmarks/bench_dag.py --sizes 10000 20000 50000 --workdir /tmp   # row 4, 20k and 50k
"""

from __future__ import annotations

import argparse
import cProfile  # noqa: F401  (the profile runs in a child: python -m cProfile)
import io
import os
import pstats
import resource
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synth_snapshot import load_note, make_snapshot, make_workdir, snakemake  # noqa: E402

BARE_SNAKEFILE = """
IDS = [int(x) for x in open("ids.txt").read().split()]
N_IC = 8

rule all:
    input:
        "results/analyses/bench/qc.tsv",
        "results/analyses/bench/meta/stouffer/z.nii.gz",
        "results/analyses/bench/figures/inputs_glass_brain.png",
        expand("results/analyses/bench/ica/component_{k}.png", k=range(N_IC)),

rule download:
    output: "results/images/{image_id}/metadata.json"
    resources: nv_connections=1
    shell: "touch {output}"

rule zmap:
    input: "results/images/{image_id}/metadata.json"
    output: z="results/images/{image_id}/zmap.nii.gz", qc="results/images/{image_id}/qc.json"
    shell: "touch {output}"

rule qc:
    input:
        qc=expand("results/images/{i}/qc.json", i=IDS),
        z=expand("results/images/{i}/zmap.nii.gz", i=IDS),
    output: "results/analyses/bench/qc.tsv"
    shell: "touch {output}"

rule meta:
    input: qc="results/analyses/bench/qc.tsv", z=expand("results/images/{i}/zmap.nii.gz", i=IDS)
    output: "results/analyses/bench/meta/stouffer/z.nii.gz"
    shell: "touch {output}"

rule figures:
    input: qc="results/analyses/bench/qc.tsv", z=expand("results/images/{i}/zmap.nii.gz", i=IDS)
    output: "results/analyses/bench/figures/inputs_glass_brain.png"
    shell: "touch {output}"

rule ica:
    input:
        qc="results/analyses/bench/qc.tsv",
        z=expand("results/images/{i}/zmap.nii.gz", i=IDS),
        m=expand("results/images/{i}/metadata.json", i=IDS),
    output: expand("results/analyses/bench/ica/component_{k}.png", k=range(N_IC))
    shell: "touch {output}"
"""


def _children_maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


def _timed(cmd: list[str], cwd: Path) -> tuple[float, str]:
    t0 = time.perf_counter()
    proc = subprocess.run(
        cmd,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=dict(os.environ, PYTHONWARNINGS="ignore"),
    )
    secs = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"failed: {' '.join(cmd)}\n{proc.stdout[-4000:]}")
    return secs, proc.stdout


def _maxrss_of(cmd: list[str], cwd: Path) -> tuple[float, float, str]:
    """Run ``cmd`` in a fresh python parent so RUSAGE_CHILDREN is this command's alone."""
    wrapper = textwrap.dedent(
        """
        import resource, subprocess, sys, time, json, os
        t0 = time.perf_counter()
        p = subprocess.run(sys.argv[1:], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        secs = time.perf_counter() - t0
        rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        print(json.dumps({"rc": p.returncode, "secs": secs, "rss": rss, "out": p.stdout[-4000:]}))
        """
    )
    import json

    proc = subprocess.run(
        [sys.executable, "-c", wrapper, *cmd],
        cwd=cwd,
        stdout=subprocess.PIPE,
        text=True,
        env=dict(os.environ, PYTHONWARNINGS="ignore"),
    )
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    if res["rc"] != 0:
        raise RuntimeError(f"failed: {' '.join(cmd)}\n{res['out']}")
    return res["secs"], res["rss"], res["out"]


def _n_jobs(out: str) -> int:
    """Total of Snakemake's dry-run job table."""
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] == "total" and parts[1].isdigit():
            return int(parts[1])
    return -1


def bench_dag(n: int, tmp: Path, profile: bool) -> None:
    snap = make_snapshot(tmp / f"snap{n}", n, pool=50, seed=0)
    root = snap["root"].resolve()
    n_sel_expected = n
    wf = make_workdir(
        tmp / f"wf{n}",
        {
            "neurovault": {"url": str(root), "mode": "download_new"},
            "template": {"mask": "mni152_2mm"},
            "analyses": {
                "bench": {
                    "image_terms": {"map_type": {"in": ["T map", "Z map"]}, "analysis_level": "group"},
                    "max_images": n,
                    "meta": {"methods": ["stouffer"]},
                    "ica": {},
                }
            },
        },
    )
    t_query, _ = snakemake(wf, "results/analyses/bench/selection.tsv", cores=2)
    n_sel = sum(1 for _ in open(wf / "results/analyses/bench/selection.tsv")) - 1
    assert n_sel == n_sel_expected, (n_sel, n_sel_expected)

    sm = [sys.executable, "-m", "snakemake", "-n", "--cores", "2"]
    t_nv, rss_nv, out_nv = _maxrss_of([*sm, "--configfile", "bench.yaml"], wf)
    jobs_nv = _n_jobs(out_nv)
    # -q: the same DAG is built, then Snakemake stops instead of listing (and dry-"running") each job
    t_nv_q, _, _ = _maxrss_of([*sm, "-q", "--configfile", "bench.yaml"], wf)

    bare = tmp / f"bare{n}"
    bare.mkdir()
    (bare / "Snakefile").write_text(BARE_SNAKEFILE)
    (bare / "ids.txt").write_text("\n".join(map(str, snap["image_ids"])))
    t_bare, rss_bare, out_bare = _maxrss_of([*sm, "--resources", "nv_connections=2"], bare)
    jobs_bare = _n_jobs(out_bare)
    print(
        f"DAG {n} images: query (snapshot dir, real run) {t_query:.1f} s; `snakemake -n` full target: "
        f"nvmeta {t_nv:.1f} s ({jobs_nv} jobs, peak RSS {rss_nv:.0f} MB; with -q {t_nv_q:.1f} s) vs bare "
        f"Snakefile of the same shape {t_bare:.1f} s ({jobs_bare} jobs, {rss_bare:.0f} MB): ratio "
        f"{t_nv / t_bare:.2f}; {load_note()}",
        flush=True,
    )
    if profile:
        prof = tmp / f"dag{n}.prof"
        t_prof, _ = _timed(
            [
                sys.executable,
                "-m",
                "cProfile",
                "-o",
                str(prof),
                "-m",
                "snakemake",
                "-n",
                "--cores",
                "2",
                "--configfile",
                "bench.yaml",
            ],
            wf,
        )
        print(f"  cProfile of the nvmeta dry run at {n} images ({t_prof:.1f} s under the profiler):")
        for key, label in (("cumulative", "by cumulative time"), ("tottime", "by own time")):
            s = io.StringIO()
            st = pstats.Stats(str(prof), stream=s)
            st.strip_dirs().sort_stats(key).print_stats(22)
            lines = [ln for ln in s.getvalue().splitlines() if ln.strip()]
            start = next(i for i, ln in enumerate(lines) if ln.lstrip().startswith("ncalls"))
            print(f"  -- {label}")
            for ln in lines[start : start + 23]:
                print("    " + ln)


FANIN_JOB = """
import json, resource, sys, time
from pathlib import Path
from nvmeta.meta import run_method
from nvmeta.images.template import load_mask
qc, pool_dir, n_pool, out = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
pool = [pool_dir / f"z{j}.nii.gz" for j in range(n_pool)]
t0 = time.perf_counter()
s = run_method("stouffer", qc, lambda i: pool[i % n_pool], load_mask("mni152_2mm"), {}, out)
print(json.dumps({"secs": time.perf_counter() - t0, "k": s["k_maps"],
                  "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""

BASELINE_JOB = """
import json, resource, sys, time
import numpy as np, nibabel as nib
from pathlib import Path
from scipy import stats
from nvmeta.images.template import load_mask
pool_dir, n_pool, n = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
mask = np.asarray(load_mask("mni152_2mm").dataobj) > 0
t0 = time.perf_counter()
X = np.empty((n, int(mask.sum())))            # maps x voxels, float64 (NiMARE-style masked stack)
for i in range(n):
    X[i] = nib.load(pool_dir / f"z{i % n_pool}.nii.gz").get_fdata()[mask]
k = np.isfinite(X).sum(0)
z = np.nansum(X, 0) / np.sqrt(np.maximum(k, 1))
p = stats.norm.sf(np.abs(z)) * 2
print(json.dumps({"secs": time.perf_counter() - t0,
                  "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def _make_zpool(d: Path, n_pool: int = 40) -> None:
    """``n_pool`` template-grid z-maps: pairs ``blob + noise_j`` and ``blob - noise_j`` (smooth noise), so
    that over a multiple of ``n_pool`` maps the noise cancels and the meta z-map is one blob (a handful
    of clusters, as real data; repeating a few noise maps thousands of times would make every voxel
    significant). Every 10th pair has no data below z index 15 (partial coverage)."""
    import nibabel as nib
    import numpy as np
    from scipy import ndimage

    from nvmeta.images.template import load_mask

    d.mkdir(parents=True, exist_ok=True)
    mimg = load_mask("mni152_2mm")
    mask = np.asarray(mimg.dataobj) > 0
    ii, jj, kk = np.indices(mask.shape, dtype=np.float32)
    blob = 0.8 * np.exp(-((ii - 45) ** 2 + (jj - 70) ** 2 + (kk - 50) ** 2) / (2 * 4.0**2))
    rng = np.random.default_rng(0)
    for j in range(n_pool // 2):
        noise = ndimage.gaussian_filter(rng.standard_normal(mask.shape, dtype=np.float32), 2.0)
        noise /= noise[mask].std()
        for sign, idx in ((1.0, 2 * j), (-1.0, 2 * j + 1)):
            z = (blob + sign * noise).astype(np.float32)
            z[~mask] = np.nan
            if j % 10 == 9:
                z[:, :, :15] = np.nan
            nib.save(nib.Nifti1Image(z, mimg.affine), d / f"z{idx}.nii.gz")


def bench_fanin(sizes: list[int], tmp: Path, baseline_max: int) -> None:
    import pandas as pd

    pool = tmp / "zpool"
    _make_zpool(pool)
    import numpy as np

    from nvmeta.images.template import load_mask

    n_vox = int((np.asarray(load_mask("mni152_2mm").dataobj) > 0).sum())
    for n in sizes:
        qc = tmp / f"qc{n}.tsv"
        pd.DataFrame(
            {
                "image_id": np.arange(1, n + 1),
                "collection_id": np.arange(1, n + 1) // 10 + 1,
                "number_of_subjects": 20 + np.arange(n) % 30,
                "status": "included",
                "reason": "",
            }
        ).to_csv(qc, sep="\t", index=False)
        out = subprocess.run(
            [sys.executable, "-c", FANIN_JOB, str(qc), str(pool), "40", str(tmp / f"meta{n}")],
            capture_output=True,
            text=True,
            check=True,
        )
        import json

        r = json.loads(out.stdout.strip().splitlines()[-1])
        assert r["k"] == n, r
        stack_mb = n * n_vox * 8 / 2**20
        if n <= baseline_max:
            b = subprocess.run(
                [sys.executable, "-c", BASELINE_JOB, str(pool), "40", str(n)],
                capture_output=True,
                text=True,
                check=True,
            )
            rb = json.loads(b.stdout.strip().splitlines()[-1])
            base = f"in-memory stack baseline {rb['rss']:.0f} MB peak ({rb['secs']:.1f} s)"
            ratio = f"ratio {r['rss'] / rb['rss']:.2f}"
        else:
            base = f"in-memory stack baseline not run: its maps x voxels float64 array alone is {stack_mb / 1024:.1f} GB"
            ratio = f"ratio <= {r['rss'] / stack_mb:.3f}"
        print(
            f"fan-in meta stouffer over {n} maps ({n_vox} voxels): nvmeta peak RSS {r['rss']:.0f} MB "
            f"({r['secs']:.1f} s incl. outputs and figure) vs {base}: {ratio}; {load_note()}",
            flush=True,
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="*", default=[1000, 10000])
    p.add_argument("--profile", action="store_true")
    p.add_argument("--fanin", type=int, nargs="*", default=[])
    p.add_argument("--baseline-max", type=int, default=1000)
    p.add_argument("--workdir", type=Path, default=None)
    args = p.parse_args()
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        tmp = Path(tmp)
        for n in args.sizes:
            bench_dag(n, tmp, args.profile)
        if args.fanin:
            bench_fanin(args.fanin, tmp, args.baseline_max)


if __name__ == "__main__":
    main()
