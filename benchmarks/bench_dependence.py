"""False-positive rates under within-collection dependence: naive against ``meta.dependence: cluster_robust``.

Maps are simulated with :func:`nvmeta.testing.dependent_maps.simulate`: ``G`` collections of ``m``
maps (contrasts of the same participants), correlated at ``ρ`` within a collection, independent
between, and no effect anywhere. Every voxel is an independent replication of the same
meta-analysis, so a method's false-positive rate is the fraction of voxels with ``p < 0.05``
(two-sided). Each nvmeta method runs through its estimator class (the job's own code) with
``dependence: none`` and ``cluster_robust``; NiMARE 0.22's own dependence handling runs on the
same maps written as images: ``Stouffers(groupby=...)`` (Kost & McDermott's variance inflation
from the estimated null correlation of the maps) and ``DerSimonianLaird(groupby=...)`` (CR2 with
Satterthwaite df and its default correlated-effects weights, ``weight_scheme="rescale"``).

The permutation test controls the family-wise error rate, so it is measured per replication:
``R`` analyses of ``V`` null voxels each; the FWER is the fraction of analyses with some voxel at
``p_fwe < 0.05``. nvmeta flips maps one by one (``none``) or whole collections
(``cluster_robust``); NiMARE's ``PermutedOLS(groupby=...)`` averages each collection and flips
the collection means (``FWECorrector(method="montecarlo")``).

What the option costs is measured with ``--timing N``: ``N`` one-sample t maps on the MNI152 2 mm
grid (``bench_meta.prepare_effect``'s pool, in collections of 5), each method run with all its
outputs by :func:`nvmeta.meta.run_method` in a fresh process with ``dependence: none`` and then
``cluster_robust``: wall time and peak resident memory, with the ratio.

Usage::

    python benchmarks/bench_dependence.py [--voxels 20000] [--reps 400] [--no-nimare] [--seed 0]
    python benchmarks/bench_dependence.py --timing 500 [--workdir /tmp/nvmeta-dependence]
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from nvmeta.meta import frozen_gc  # noqa: E402
from nvmeta.meta.registry import get_estimator  # noqa: E402
from nvmeta.meta.run import _complete  # noqa: E402
from nvmeta.testing.dependent_maps import ArraySource, DependentMaps, simulate  # noqa: E402

#: (label, G, maps per collection, rho)
SCENARIOS = [
    ("G=10, m=4, ρ=0.5", 10, 4, 0.5),
    ("G=20, m=4, ρ=0.5", 20, 4, 0.5),
    ("G=40, m=4, ρ=0.5", 40, 4, 0.5),
    ("G=20, m=4, ρ=0 (independent)", 20, 4, 0.0),
    ("G=20, m=8, ρ=0.8", 20, 8, 0.8),
    ("G=20, m=1..8 (unequal), ρ=0.5", 20, [1, 2, 3, 4, 5, 6, 7, 8] * 2 + [1, 2, 3, 4], 0.5),
]
PERM_SCENARIOS = [("G=12, m=3, ρ=0.6", 12, 3, 0.6), ("G=20, m=4, ρ=0.5", 20, 4, 0.5)]
METHODS = ["stouffer", "weighted_stouffer", "ttest", "fixed_effects_hedges", "dersimonian_laird"]


def fpr(maps: DependentMaps, method: str, cfg: dict, workdir: Path) -> float:
    est = get_estimator(method)(cfg, workdir=workdir)
    try:
        fit = est.fit(ArraySource(maps, str(cfg["dependence"])), 2)
    finally:
        est.close()
    return float(np.mean(np.exp(fit.logp[fit.reported]) < 0.05))


def nimare_dataset(maps: DependentMaps, root: Path, kind: str):
    """The maps as images of a (V, 1, 1) grid, in a NiMARE Dataset with each map's collection."""
    import nibabel as nib
    from nimare.dataset import Dataset

    root.mkdir(parents=True, exist_ok=True)
    n_vox = maps.z.shape[1]
    mask = nib.Nifti1Image(np.ones((n_vox, 1, 1), np.uint8), np.eye(4))
    source = {}
    for i in range(len(maps.n)):
        images = {}
        z_arrays = {"z": maps.z[i], "beta": maps.z[i], "varcope": np.ones(n_vox)}  # varcope 1: weights 1
        arrays = z_arrays if kind == "z" else {"beta": maps.g[i], "varcope": maps.v[i]}
        for name, values in arrays.items():
            path = root / f"{kind}{i}_{name}.nii.gz"
            nib.save(nib.Nifti1Image(values.astype(np.float32).reshape(n_vox, 1, 1), np.eye(4)), path)
            images[name] = str(path)
        meta = {"sample_sizes": [float(maps.n[i])], "collection": int(maps.collection[i])}
        source[f"s{i:04d}"] = {"contrasts": {"1": {"images": images, "metadata": meta}}}
    with warnings.catch_warnings(), frozen_gc():
        warnings.simplefilter("ignore")
        return Dataset(source, target=None, mask=mask)


def nimare_fpr(maps: DependentMaps, root: Path) -> dict[str, float]:
    from nimare.meta.ibma import DerSimonianLaird, Stouffers

    out = {}
    for label, est, kind in (
        ("NiMARE Stouffers(groupby)", Stouffers(groupby="collection"), "z"),
        ("NiMARE DerSimonianLaird(groupby)", DerSimonianLaird(groupby="collection"), "g"),
    ):
        dset = nimare_dataset(maps, root / kind, kind)
        with warnings.catch_warnings(), frozen_gc():
            warnings.simplefilter("ignore")
            res = est.fit(dset)
        p = np.asarray(res.get_map("p").dataobj, np.float64).ravel()
        out[label] = float(np.mean(p < 0.05))
    return out


def fwer(rng, g, m, rho, n_vox, reps, n_perm, workdir: Path) -> dict[str, float]:
    """FWER of nvmeta's permutation test, maps flipped one by one and whole collections flipped."""
    base = _complete({"jackknife": False, "n_perm": n_perm})
    labels = {
        "none": "nvmeta, maps flipped (none)",
        "cluster_robust": "nvmeta, collections flipped (cluster_robust)",
    }
    hits = dict.fromkeys(labels.values(), 0)
    for r in range(reps):
        maps = simulate(rng, g, m, rho, n_vox)
        for dep, label in labels.items():
            est = get_estimator("permutation")(
                {**base, "random_state": r, "dependence": dep}, workdir=workdir
            )
            fit = est.fit(ArraySource(maps, dep), 2)
            est.close()
            hits[label] += bool(np.any(fit.p_fwe[fit.reported] < 0.05))
    return {k: v / reps for k, v in hits.items()}


def nimare_fwer(rng, g, m, rho, n_vox, reps, n_perm, workdir: Path) -> float:
    """FWER of NiMARE's ``PermutedOLS(groupby=...)`` with its Monte-Carlo FWE correction."""
    from nimare.correct import FWECorrector
    from nimare.meta.ibma import PermutedOLS

    hits = 0
    for r in range(reps):
        dset = nimare_dataset(simulate(rng, g, m, rho, n_vox), workdir / f"perm{r}", "z")
        with warnings.catch_warnings(), frozen_gc():
            warnings.simplefilter("ignore")
            res = PermutedOLS(groupby="collection", random_state=r).fit(dset)
            cres = FWECorrector(method="montecarlo", n_iters=n_perm).transform(res)
        hits += bool(
            np.any(np.asarray(cres.get_map("p_level-voxel_corr-FWE_method-montecarlo").dataobj) < 0.05)
        )
    return hits / reps


def nimare_agreement(rng, n_vox: int, workdir: Path) -> None:
    """nvmeta's cluster-robust fits beside NiMARE's ``groupby=`` fits of the same maps, with its
    weights as nvmeta's (``weight_scheme="individual"``) and its default (``"rescale"``)."""
    from nimare.meta.ibma import DerSimonianLaird, WeightedLeastSquares

    maps = simulate(rng, 20, [1, 2, 3, 4, 5, 6, 7, 8] * 2 + [1, 2, 3, 4], 0.5, n_vox, effect=0.3)
    sets = {
        "g": nimare_dataset(maps, workdir / "agree-g", "g"),
        "z": nimare_dataset(maps, workdir / "agree-z", "z"),
    }
    robust = _complete({"jackknife": False, "dependence": "cluster_robust"})
    print(f"nvmeta (cluster_robust) against NiMARE (groupby='collection') on the same {len(maps.n)} maps "
          f"in 20 collections of 1-8, planted g = 0.3, {n_vox} voxels\n")  # fmt: skip
    print(
        "| method | NiMARE weight_scheme | max abs diff z | max abs diff est | se ratio (min-max) | df median nvmeta / NiMARE |"
    )
    print("|---|---|---|---|---|---|")
    for method, cls, kw, kind in (("stouffer", WeightedLeastSquares, {"tau2": 0}, "z"),
                                  ("fixed_effects_hedges", WeightedLeastSquares, {"tau2": 0}, "g"),
                                  ("dersimonian_laird", DerSimonianLaird, {}, "g")):  # fmt: skip
        est = get_estimator(method)(robust, workdir=workdir)
        fit = est.fit(ArraySource(maps, "cluster_robust"), 2)
        est.close()
        for scheme in ("individual", "rescale"):
            with warnings.catch_warnings(), frozen_gc():
                warnings.simplefilter("ignore")
                res = cls(groupby="collection", weight_scheme=scheme, **kw).fit(
                    sets["z"] if kind == "z" else sets["g"]
                )
            ref = {
                k: np.asarray(res.get_map(k).dataobj, np.float64).ravel() for k in ("z", "est", "se", "dof")
            }
            dz = np.max(np.abs(fit.z - ref["z"]))
            if method == "stouffer":  # its est is the mean z (NiMARE's est), not written by nvmeta
                dest, ratio = "(mean z)", "-"
            else:
                dest = f"{np.max(np.abs(fit.maps['est'] - ref['est'])):.2g}"
                r = fit.maps["se"] / ref["se"]
                ratio = f"{r.min():.3f}-{r.max():.3f}"
            print(f"| {method} | {scheme} | {dz:.2g} | {dest} | {ratio} | "
                  f"{fit.summary['df_median']:.2f} / {np.median(ref['dof']):.2f} |")  # fmt: skip
    print()


TIMED = ["stouffer", "weighted_stouffer", "ttest", "fixed_effects_hedges", "dersimonian_laird", "permutation"]


def timing_worker(method: str, data: Path, out: Path, dep: str) -> dict:
    """One method over the prepared maps, as the rule runs it (all outputs)."""
    from nvmeta.images.template import load_mask
    from nvmeta.meta import run_method

    pool = json.loads((data / "pool.json").read_text())["pool"]

    def d(i: int) -> Path:
        return data / "pool" / str((i - 1) % pool)

    t0 = time.perf_counter()
    s = run_method(method, data / "qc_collections.tsv", lambda i: d(i) / "zmap.nii.gz", load_mask("mni152_2mm"),
                   _complete({"dependence": dep}), out, None, n_jobs=2 if method == "permutation" else 1,
                   qc_json_for=lambda i: d(i) / "qc.json",
                   effect_paths_for=lambda i: (d(i) / "g.nii.gz", d(i) / "varg.nii.gz"))  # fmt: skip
    return {"seconds": time.perf_counter() - t0, "k_units": s["k_units"],
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}  # fmt: skip


def timing(n: int, workdir: Path) -> None:
    import pandas as pd
    from bench_meta import prepare_effect

    data = workdir / f"maps_{n}"
    prepare_effect(data, n, 50)
    qc = pd.read_csv(data / "qc.tsv", sep="\t")
    qc.assign(collection_id=1 + (qc["image_id"] - 1) // 5).to_csv(
        data / "qc_collections.tsv", sep="\t", index=False
    )
    print(f"{n} maps in {n // 5} collections of 5, MNI152 2 mm; load average {os.getloadavg()[0]:.1f}\n")
    print("| method | none: s / peak MB | cluster_robust: s / peak MB | time ratio |")
    print("|---|---|---|---|")
    for method in TIMED:
        res = {}
        for dep in ("none", "cluster_robust"):
            cmd = [
                sys.executable,
                __file__,
                "--worker",
                method,
                str(data),
                str(workdir / "out" / method / dep),
                dep,
            ]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode:
                raise RuntimeError(proc.stderr)
            res[dep] = json.loads(proc.stdout.strip().splitlines()[-1])
        a, b = res["none"], res["cluster_robust"]
        print(f"| {method} | {a['seconds']:.1f} / {a['peak_rss_mb']:.0f} | {b['seconds']:.1f} / {b['peak_rss_mb']:.0f} "
              f"| {b['seconds'] / a['seconds']:.2f} |", flush=True)  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--voxels", type=int, default=20_000, help="null voxels per scenario (replications)")
    ap.add_argument("--reps", type=int, default=400, help="replications of the permutation test")
    ap.add_argument("--perm-voxels", type=int, default=20, help="voxels per permutation replication")
    ap.add_argument("--n-perm", type=int, default=199)
    ap.add_argument("--nimare-reps", type=int, default=100, help="replications of NiMARE's PermutedOLS")
    ap.add_argument("--no-nimare", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--timing", type=int, metavar="N", help="time the option on N maps of the 2 mm grid instead"
    )
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "nvmeta-dependence")
    ap.add_argument("--worker", nargs=4, metavar=("METHOD", "DATA", "OUT", "DEP"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        logging.disable(logging.WARNING)
        method, data, out, dep = args.worker
        print(json.dumps(timing_worker(method, Path(data), Path(out), dep)))
        return
    if args.timing:
        timing(args.timing, args.workdir)
        return
    logging.disable(logging.WARNING)  # the per-fit warnings (few collections, ...) are the point here
    print(f"load average {os.getloadavg()[0]:.1f}; alpha = 0.05 two-sided; {args.voxels} null voxels per row")
    se = math.sqrt(0.05 * 0.95 / args.voxels)
    print(f"binomial standard error of a rate of 0.05: {se:.4f}\n")
    rng = np.random.default_rng(args.seed)
    naive, robust = (
        _complete({"jackknife": False}),
        _complete({"jackknife": False, "dependence": "cluster_robust"}),
    )
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        header = ["scenario"] + [f"{m} none / CR" for m in METHODS] + ["fisher none"]
        rows = []
        for label, g, m, rho in SCENARIOS:
            t0 = time.perf_counter()
            maps = simulate(rng, g, m, rho, args.voxels)
            cells = [label]
            for method in METHODS:
                cells.append(f"{fpr(maps, method, naive, work):.3f} / {fpr(maps, method, robust, work):.3f}")
            cells.append(f"{fpr(maps, 'fisher', naive, work):.3f}")
            nim = {} if args.no_nimare else nimare_fpr(maps, work / f"nimare-{len(rows)}")
            rows.append((cells, nim))
            print(f"  {label}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        nim_cols = list(rows[0][1]) if rows and rows[0][1] else []
        print("| " + " | ".join(header + nim_cols) + " |")
        print("|" + "---|" * (len(header) + len(nim_cols)))
        for cells, nim in rows:
            print("| " + " | ".join(cells + [f"{nim[c]:.3f}" for c in nim_cols]) + " |")
        print()
        if not args.no_nimare:
            nimare_agreement(rng, 2000, work)
        print(f"\nFWER of the permutation test: {args.reps} replications of {args.perm_voxels} null voxels, "
              f"n_perm = {args.n_perm} (NiMARE: {args.nimare_reps} replications)")  # fmt: skip
        se_r = math.sqrt(0.05 * 0.95 / args.reps)
        print(f"binomial standard error of a rate of 0.05 over {args.reps} replications: {se_r:.4f}\n")
        for label, g, m, rho in PERM_SCENARIOS:
            t0 = time.perf_counter()
            rates = fwer(rng, g, m, rho, args.perm_voxels, args.reps, args.n_perm, work)
            if not args.no_nimare:
                rates["NiMARE PermutedOLS(groupby)"] = nimare_fwer(
                    rng, g, m, rho, args.perm_voxels, args.nimare_reps, args.n_perm, work
                )
            print(f"| {label} | " + " | ".join(f"{k}: {v:.3f}" for k, v in rates.items()) + " |")
            print(f"  {label}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
