"""Benchmark of the cross-study ICA (nvmeta.ica): time and peak memory at 1,000 and 10,000 maps.

Synthetic maps on the real MNI152 2 mm brain mask (~228k voxels): ``n_sources`` planted Gaussian blobs
mixed with random weights plus Gaussian noise (every 10th map has no data below z index 15). Each
measurement runs in its own subprocess; its peak resident memory is read by a fresh parent with
``resource.getrusage(RUSAGE_CHILDREN).ru_maxrss`` so measurements do not contaminate each other.

Measurements
------------
``arrays N``      nvmeta: maps generated straight into the memmap builder (:func:`nvmeta.ica.build_matrix`,
                  no NIfTI files), then :func:`nvmeta.ica.decompose` with the default config
                  (randomised PCA above 500 maps to 3 x 8 dimensions, then FastICA).
``nifti 1000``    nvmeta end to end, :func:`nvmeta.ica.run_ica` reading 1,000 ``.nii.gz`` z-maps (2 reader
                  threads) and writing every output of the ICA job (the PNGs are jobs of their own).
``unreduced 1000`` nvmeta without the PCA step (``reduce_above`` above N): FastICA on the memmap-built
                  voxels x maps matrix, as the example but float32 and without a list of arrays.
``example 1000``  the nilearn example's approach on the same NIfTIs: a Python list of masked maps (read with
                  nibabel, non-finite -> 0), ``np.vstack``, ``FastICA(8, random_state=0).fit_transform(X.T)``.

Every run also reports how well the 8 planted sources are recovered (median and min |r| after Hungarian
matching), so that the faster path is not a worse one.

Usage::

    python benchmarks/bench_ica.py                 # 1k (all four) and 10k (arrays) maps
    python benchmarks/bench_ica.py --sizes 1000    # only the 1k runs
    python benchmarks/bench_ica.py --workdir /big/tmp
    python benchmarks/bench_ica.py --pain           # convergence on the demo's 21 pain maps

``--pain`` builds the demo's pain analysis from the bundled snapshot (tests/data/snapshot, z-maps by the
z-map job's own function, df = n - 1) and runs, for seeds 0, 1, 2 with 1 and 2 BLAS threads, scikit-learn's
``FastICA(4, random_state=seed)`` (the baseline, default max_iter=200, tol=1e-4) and nvmeta's FastICA
with the config defaults: iterations, converged, time, and the matched |r| between the 1- and 2-thread
components.

The 10k run needs ~9.2 GB of free disk for the memory-mapped matrix (removed afterwards).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

N_SOURCES = 8
N_COMPONENTS = 8
SEED = 0


# ------------------------------------------------------------------------------------------------------
# synthetic data
# ------------------------------------------------------------------------------------------------------
def _mask():
    from nvmeta.images.template import load_mask

    img = load_mask("mni152_2mm")
    return img, np.asarray(img.dataobj) > 0


def _patterns(mask: np.ndarray) -> np.ndarray:
    """N_SOURCES x mask-voxel Gaussian blobs (sigma 4 voxels) centred on random mask voxels."""
    rng = np.random.default_rng(1234)
    ijk = np.argwhere(mask).astype(np.float32)
    centres = ijk[rng.choice(len(ijk), N_SOURCES, replace=False)]
    return np.stack([np.exp(-((ijk - c) ** 2).sum(1) / (2 * 4.0**2)) for c in centres]).astype(np.float32)


def _weights(n_maps: int) -> np.ndarray:
    return np.random.default_rng(SEED).normal(0, 2.0, (n_maps, N_SOURCES)).astype(np.float32)


def iter_synthetic_maps(n_maps: int, mask: np.ndarray, patterns: np.ndarray):
    """Yield ``n_maps`` masked maps (float32, NaN = no data) in order."""
    weights = _weights(n_maps)
    low = np.argwhere(mask)[:, 2] < 15
    for i in range(n_maps):
        rng = np.random.default_rng([SEED, i])
        m = weights[i] @ patterns + rng.standard_normal(patterns.shape[1], dtype=np.float32) * 0.5
        if i % 10 == 0:
            m[low] = np.nan
        yield m


def _recovery(components: np.ndarray, patterns: np.ndarray, columns: np.ndarray | None = None) -> dict:
    from nvmeta.ica import match_components

    if columns is not None:
        patterns = patterns[:, columns]
    _, r = match_components(patterns, components)
    return {"median_abs_r": float(np.median(r)), "min_abs_r": float(np.min(r))}


def write_niftis(n_maps: int, root: Path) -> None:
    """Write the synthetic maps as ``.nii.gz`` z-maps with qc.tsv and metadata.json (not timed)."""
    import nibabel as nib
    import pandas as pd

    img, mask = _mask()
    patterns = _patterns(mask)
    ids = list(range(1, n_maps + 1))
    for iid, m in zip(ids, iter_synthetic_maps(n_maps, mask, patterns), strict=True):
        d = root / "images" / str(iid)
        d.mkdir(parents=True, exist_ok=True)
        vol = np.full(mask.shape, np.nan, dtype=np.float32)
        vol[mask] = m
        nib.save(nib.Nifti1Image(vol, img.affine), d / "zmap.nii.gz")
        (d / "metadata.json").write_text(json.dumps({"id": iid, "name": f"map {iid}"}))
    pd.DataFrame({"image_id": ids, "status": "included"}).to_csv(root / "qc.tsv", sep="\t", index=False)


# ------------------------------------------------------------------------------------------------------
# one measurement (runs in a subprocess)
# ------------------------------------------------------------------------------------------------------
def work(mode: str, n_maps: int, workdir: Path, threads: int) -> dict:
    from threadpoolctl import threadpool_limits

    from nvmeta import ica
    from nvmeta.workflow.config import defaults

    cfg = defaults("ica")

    t0 = time.perf_counter()
    img, mask = _mask()
    patterns = _patterns(mask)
    out: dict = {"mode": mode, "n_maps": n_maps, "n_voxels": int(mask.sum())}
    if mode in ("arrays", "unreduced"):
        tmp = Path(tempfile.mkdtemp(prefix="bench_ica_", dir=workdir))
        try:
            with threadpool_limits(limits=threads):
                matrix = ica.build_matrix(
                    iter_synthetic_maps(n_maps, mask, patterns),
                    n_maps,
                    patterns.shape[1],
                    tmp / "data.f32",
                    standardize=cfg["standardize"],
                )
                t1 = time.perf_counter()
                columns = ica.select_voxels(matrix.count, n_maps, cfg["nodata"], cfg["min_fraction"])
                reduce_above = cfg["reduce_above"] if mode == "arrays" else n_maps + 1
                dec = ica.decompose(
                    matrix, columns, {**cfg, "n_components": N_COMPONENTS, "reduce_above": reduce_above}
                )
                t2 = time.perf_counter()
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        out.update(
            build_s=t1 - t0,
            decompose_s=t2 - t1,
            reduced=dec.reduced,
            n_iter=dec.info["n_iter"],
            converged=dec.info["converged"],
            **_recovery(dec.components, patterns, columns),
        )
        out["pca_variance"] = (dec.info.get("pca") or {}).get("explained_variance_ratio")
    elif mode == "nifti":
        root = workdir / f"nifti_{n_maps}"
        outdir = Path(tempfile.mkdtemp(prefix="bench_ica_out_", dir=workdir))
        try:
            summary = ica.run_ica(
                root / "qc.tsv",
                lambda i: root / "images" / str(i) / "zmap.nii.gz",
                lambda i: root / "images" / str(i) / "metadata.json",
                img,
                {**cfg, "n_components": N_COMPONENTS},
                outdir,
                threads=threads,
            )
            import nibabel as nib

            comps = np.asarray(nib.load(outdir / "components.nii.gz").dataobj)[mask].T
        finally:
            shutil.rmtree(outdir, ignore_errors=True)
        ok = np.isfinite(comps).all(axis=0)
        out.update(reduced=summary["reduced"], **_recovery(comps[:, ok], patterns, ok))
    elif mode == "example":
        import nibabel as nib
        from sklearn.decomposition import FastICA

        root = workdir / f"nifti_{n_maps}"
        x = []
        for iid in range(1, n_maps + 1):
            vol = nib.load(root / "images" / str(iid) / "zmap.nii.gz").get_fdata(dtype=np.float32)
            x.append(np.nan_to_num(vol, nan=0.0, posinf=0.0, neginf=0.0)[mask])
        x = np.vstack(x)
        t1 = time.perf_counter()
        sources = FastICA(n_components=N_COMPONENTS, random_state=0).fit_transform(x.T).T
        t2 = time.perf_counter()
        out.update(build_s=t1 - t0, decompose_s=t2 - t1, reduced=False, **_recovery(sources, patterns))
    else:
        raise ValueError(mode)
    out["work_s"] = time.perf_counter() - t0
    return out


def measure(mode: str, n_maps: int, workdir: Path, threads: int) -> dict:
    """Run ``work`` in a child of a fresh process; return its result with peak RSS and wall time."""
    cmd = [sys.executable, __file__, "--_measure", mode, str(n_maps), str(workdir), str(threads)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"{mode} {n_maps} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def _measure_child(mode: str, n_maps: int, workdir: Path, threads: int) -> None:
    t0 = time.perf_counter()
    cmd = [sys.executable, __file__, "--_work", mode, str(n_maps), str(workdir), str(threads)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        sys.stderr.write(res.stderr)
        sys.exit(res.returncode)
    out = json.loads(res.stdout.strip().splitlines()[-1])
    out["wall_s"] = wall
    out["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024 / 1e9  # KiB on Linux
    print(json.dumps(out))


def pain_convergence(threads: int = 2) -> None:
    """Convergence of FastICA on the demo's 21 pain maps with 4 components (see the module docstring)."""
    import warnings

    from sklearn.decomposition import FastICA
    from sklearn.exceptions import ConvergenceWarning
    from threadpoolctl import threadpool_limits

    from nvmeta import ica
    from nvmeta.ica.fastica import spatial_fastica
    from nvmeta.images.template import load_mask
    from nvmeta.images.zmap import make_zmap
    from nvmeta.workflow.config import defaults

    snap = Path(__file__).resolve().parents[1] / "tests" / "data" / "snapshot"
    ids = list(range(990001, 990022))
    manifest = {e["image_id"]: e["path"] for e in json.loads((snap / "MANIFEST.json").read_text())}
    mask_img = load_mask("mni152_2mm")
    cfg = defaults("ica")
    with tempfile.TemporaryDirectory(prefix="bench_ica_pain_") as tmp:
        root = Path(tmp)
        paths = []
        for i in ids:
            d = root / str(i)
            d.mkdir()
            record = json.loads((snap / "api" / "images" / f"{i}.json").read_text())
            record["nvmeta"] = {"status": "ok"}
            (d / "metadata.json").write_text(json.dumps(record))
            make_zmap(
                d / "metadata.json",
                snap / manifest[i],
                mask_img,
                {**defaults("conversion"), "df": "n-1"},
                d / "z.nii.gz",
                d / "qc.json",
                defaults("qc"),
            )
            paths.append(d / "z.nii.gz")
        mask, affine = ica.mask_and_affine(mask_img)
        m = ica.build_matrix(
            ica.iter_masked_maps(paths, mask, 1, affine),
            len(ids),
            int(mask.sum()),
            root / "m",
            standardize=cfg["standardize"],
        )
        x = m.load(ica.select_voxels(m.count, len(ids), cfg["nodata"], cfg["min_fraction"])).T
    rows = []
    for seed in (0, 1, 2):
        for name in ("scikit-learn FastICA (baseline)", "nvmeta"):
            got = {}
            for limit in sorted({1, threads}):
                with threadpool_limits(limits=limit):
                    t0 = time.perf_counter()
                    if name.startswith("scikit"):
                        with warnings.catch_warnings(record=True) as caught:
                            warnings.simplefilter("always")
                            est = FastICA(n_components=4, random_state=seed)
                            sources = est.fit_transform(x).T
                        n_iter = int(est.n_iter_)
                        conv = not any(issubclass(c.category, ConvergenceWarning) for c in caught)
                    else:
                        sources, _, n_iter, conv, _ = spatial_fastica(x, 4, seed, cfg["max_iter"], cfg["tol"])
                    got[limit] = (sources, n_iter, conv, time.perf_counter() - t0)
            r = ica.match_components(got[1][0], got[threads][0])[1]
            for limit, (_, n_iter, conv, secs) in got.items():
                rows.append((seed, name, limit, n_iter, conv, secs, float(r.min())))
    print("\nFastICA on the demo's 21 pain maps, 4 components (231,383 voxels)\n")
    print(
        f"{'seed':>4} {'method':<32} {'threads':>7} {'n_iter':>6} {'converged':>9} {'time s':>7} {'min |r| 1 vs 2 thr':>18}"
    )
    for seed, name, limit, n_iter, conv, secs, rmin in rows:
        print(f"{seed:>4} {name:<32} {limit:>7} {n_iter:>6} {str(conv):>9} {secs:>7.1f} {rmin:>18.6f}")
    base = sum(r[5] for r in rows if r[1].startswith("scikit"))
    ours = sum(r[5] for r in rows if r[1] == "nvmeta")
    print(f"\ntotal time ratio nvmeta / scikit-learn baseline: x{ours / base:.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--pain", action="store_true", help="FastICA convergence on the demo's 21 pain maps")
    ap.add_argument("--_measure", nargs=4, help=argparse.SUPPRESS)
    ap.add_argument("--_work", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._work:
        mode, n, wd, th = args._work
        print(json.dumps(work(mode, int(n), Path(wd), int(th))))
        return
    if args._measure:
        mode, n, wd, th = args._measure
        _measure_child(mode, int(n), Path(wd), int(th))
        return
    if args.pain:
        pain_convergence(args.threads)
        return

    workdir = Path(tempfile.mkdtemp(prefix="bench_ica_", dir=args.workdir))
    rows = []
    try:
        for n in sorted(args.sizes):
            modes = ["arrays"]
            if n <= 2000:
                t = time.perf_counter()
                write_niftis(n, workdir / f"nifti_{n}")
                print(f"[setup] wrote {n} NIfTIs in {time.perf_counter() - t:.0f} s", flush=True)
                modes += ["nifti", "unreduced", "example"]
            for mode in modes:
                r = measure(mode, n, workdir, args.threads)
                rows.append(r)
                print(json.dumps(r), flush=True)
            shutil.rmtree(workdir / f"nifti_{n}", ignore_errors=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    print(
        f"\nICA benchmark: synthetic maps on the MNI152 2 mm mask ({rows[0]['n_voxels']} voxels), "
        f"{N_COMPONENTS} components, {args.threads} threads\n"
    )
    print(
        f"{'maps':>6} {'path':<10} {'reduced':>7} {'wall s':>8} {'peak RSS GB':>11} {'median |r|':>10} {'min |r|':>8}"
    )
    for r in rows:
        print(
            f"{r['n_maps']:>6} {r['mode']:<10} {str(r['reduced']):>7} {r['wall_s']:>8.1f} {r['peak_rss_gb']:>11.2f} "
            f"{r['median_abs_r']:>10.3f} {r['min_abs_r']:>8.3f}"
        )
    base = {r["n_maps"]: r for r in rows if r["mode"] == "example"}
    for r in rows:
        b = base.get(r["n_maps"])
        if b is not None and r["mode"] != "example":
            print(
                f"ratio vs example at {r['n_maps']} maps, {r['mode']}: time x{r['wall_s'] / b['wall_s']:.2f}, "
                f"peak memory x{r['peak_rss_gb'] / b['peak_rss_gb']:.2f}"
            )


if __name__ == "__main__":
    main()
