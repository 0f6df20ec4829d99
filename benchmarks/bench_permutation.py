"""Permutation method: nvmeta against what a user would run instead, nilearn's ``permuted_ols``.

The baseline is the nilearn recipe in one process: the maps masked into a maps x voxels float32
matrix (complete-data voxels, as the method uses), then
``permuted_ols(np.ones((n, 1)), Y, model_intercept=False, n_perm, two_sided_test=True,
random_state, n_jobs=2)``, i.e. the rule's 2 threads as 2 jobs. nvmeta runs
:func:`nvmeta.meta.run_method` ``("permutation", n_jobs=2)`` with all its outputs (maps, FDR /
Bonferroni / FWE, cluster tables, jackknife, mosaic). Each run is a fresh subprocess; wall time and
peak memory (the summed RSS of the process tree, sampled every 50 ms: nilearn's joblib workers are
processes) are printed, with the ratio. nvmeta draws the sign flips
of ``permuted_ols(..., n_jobs=1)``; with ``n_jobs=2`` nilearn draws others (per-job seeds), so
the fraction of voxels with p_fwe < 0.05 is compared with it, and ``--exact`` adds a
``permuted_ols(n_jobs=1)`` run on pain21 whose p_fwe is compared voxel by voxel (as a count of
permutation maxima; nilearn computes in float32, nvmeta in float64, so a near-tie can differ by
one count).

Data: ``pain21`` (the 21 real pain maps of the demo, copied onto the 2 mm mask grid, as
``bench_meta.py`` prepares them) and ``synthetic N`` (``--synthetic``, smooth noise plus a blob).

Usage::

    python benchmarks/bench_permutation.py [--synthetic 200] [--n-perm 1000] [--exact] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))


def _peak() -> dict:
    return {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}


def worker(kind: str, data: Path, out: Path, n_perm: int) -> dict:
    import nibabel as nib
    import numpy as np
    import pandas as pd

    from nvmeta.images.template import load_mask

    mask_img = load_mask("mni152_2mm")
    ids = pd.read_csv(data / "qc.tsv", sep="\t")["image_id"].tolist()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if kind == "nvmeta":
        from nvmeta.meta import run_method

        cfg = {"n_perm": n_perm, "random_state": 0}
        run_method(
            "permutation", data / "qc.tsv", lambda i: data / f"{i}.nii.gz", mask_img, cfg, out, None, n_jobs=2
        )
        p_fwe = np.asarray(nib.load(out / "p_fwe.nii.gz").dataobj, dtype=np.float64)
    else:
        from nilearn.masking import apply_mask
        from nilearn.mass_univariate import permuted_ols

        # (ensure_finite=False: nilearn's default would turn no-data voxels into zeros)
        y = apply_mask([str(data / f"{i}.nii.gz") for i in ids], mask_img, ensure_finite=False)
        y = y.astype(np.float32)
        full = np.all(np.isfinite(y), axis=0)
        res = permuted_ols(
            np.ones((len(ids), 1)),
            np.ascontiguousarray(y[:, full]),
            model_intercept=False,
            n_perm=n_perm,
            two_sided_test=True,
            random_state=0,
            n_jobs=1 if kind == "nilearn_1_job" else 2,
            output_type="dict",
        )
        mask = np.asarray(mask_img.dataobj) > 0
        vec = np.full(int(mask.sum()), np.nan)
        vec[full] = 10.0 ** -res["logp_max_t"].ravel()
        p_fwe = np.full(mask.shape, np.nan)
        p_fwe[mask] = vec
    wall = time.perf_counter() - t0
    np.save(out / f"p_fwe_{kind}.npy", p_fwe)
    return {"seconds": wall, "n_maps": len(ids), **_peak()}


def _run(kind: str, data: Path, out: Path, n_perm: int) -> dict:
    """Run one worker; its result plus the peak summed RSS of its process tree (nilearn's joblib
    workers are processes), sampled every 50 ms."""
    from bench_vs_recipe import PeakRSS

    cmd = [sys.executable, __file__, "--worker", kind, str(data), str(out), "--n-perm", str(n_perm)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    meter = PeakRSS(proc.pid)
    stdout, stderr = proc.communicate()
    tree, _single = meter.stop()
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} failed:\n{stderr[-3000:]}")
    return {**json.loads(stdout.strip().splitlines()[-1]), "tree_rss_mb": tree / 2**20}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--synthetic", type=int, default=200, help="maps of the synthetic analysis (0: none)")
    ap.add_argument("--n-perm", type=int, default=1000)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--exact", action="store_true", help="also permuted_ols(n_jobs=1) on pain21")
    ap.add_argument("--worker", nargs=3, metavar=("KIND", "DATA", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        kind, data, out = args.worker
        print(json.dumps(worker(kind, Path(data), Path(out), args.n_perm)))
        return

    import numpy as np
    from bench_meta import prepare_pain, prepare_synthetic

    work = args.workdir or Path(tempfile.mkdtemp(prefix="nvmeta_bench_perm_"))
    print(
        f"bench_permutation: n_perm {args.n_perm}; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
    )
    sets = {"pain21": work / "pain21"}
    prepare_pain(sets["pain21"])
    if args.synthetic:
        sets[f"synthetic{args.synthetic}"] = work / f"synthetic{args.synthetic}"
        prepare_synthetic(sets[f"synthetic{args.synthetic}"], args.synthetic)
    print("| analysis | maps | nvmeta s | nilearn permuted_ols s | time ratio | nvmeta peak MB | nilearn peak MB "
          "| p_fwe < 0.05: nvmeta / nilearn |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for name, data in sets.items():
        out = work / f"out_{name}"
        ours = _run("nvmeta", data, out / "nvmeta", args.n_perm)
        theirs = _run("nilearn", data, out / "nilearn", args.n_perm)
        pa = np.load(out / "nvmeta" / "p_fwe_nvmeta.npy")
        pb = np.load(out / "nilearn" / "p_fwe_nilearn.npy")
        frac = [float(np.mean(p[np.isfinite(p)] < 0.05)) for p in (pa, pb)]
        print(
            f"| {name} | {ours['n_maps']} | {ours['seconds']:.1f} | {theirs['seconds']:.1f} | "
            f"{ours['seconds'] / theirs['seconds']:.3f}x | {ours['tree_rss_mb']:,.0f} | "
            f"{theirs['tree_rss_mb']:,.0f} ({ours['tree_rss_mb'] / theirs['tree_rss_mb']:.2f}x) | "
            f"{frac[0]:.4f} / {frac[1]:.4f} |",
            flush=True,
        )
        if args.exact and name == "pain21":
            one = _run("nilearn_1_job", data, out / "nilearn1", args.n_perm)
            pc = np.load(out / "nilearn1" / "p_fwe_nilearn_1_job.npy")
            ok = np.isfinite(pa) & np.isfinite(pc)
            diff = np.abs(np.rint(pa[ok] * (args.n_perm + 1)) - np.rint(pc[ok] * (args.n_perm + 1)))
            print(
                f"  pain21 against permuted_ols(n_jobs=1) ({one['seconds']:.1f} s): {int(ok.sum()):,} voxels, "
                f"{int((diff > 0).sum())} differ, by at most {int(diff.max())} permutation count(s); "
                f"voxels with a p_fwe in one only: {int(np.sum(np.isfinite(pa) != np.isfinite(pc)))}",
                flush=True,
            )


if __name__ == "__main__":
    main()
