"""Benchmark: nvmeta's streaming Stouffer vs NiMARE's ``Stouffers`` on the same z-maps.

Two analyses:

- ``pain21``: the 21 real pain studies (NeuroVault collection 1425, sample data), t → z with
  ``df = N − 1`` and copied onto the MNI152 2 mm mask grid (99 × 117 × 95, 235,375 voxels);
  real partial coverage.
- ``synthetic1000``: 1,000 synthetic float32 z-maps on the same grid (smoothed Gaussian
  noise, FWHM ≈ 9.4 mm, unit variance, plus a blob of signal), full coverage.

Each measurement runs in a fresh subprocess (so peak memory is not polluted by the other
run): wall time and peak RSS (``resource.getrusage(RUSAGE_SELF).ru_maxrss``) of

- ``nvmeta``: :func:`nvmeta.meta.run_method` ``("stouffer")`` with all its outputs (maps,
  q/FDR/Bonferroni, two cluster tables, the PNG); its ``seconds_estimation`` (reading the
  maps + combining) is reported too;
- ``nimare``: ``nimare.meta.ibma.Stouffers(groupby=False)`` ``.fit(dataset)`` on a Dataset
  of the same files (default liberal mask), i.e. the z/p maps only.

The baseline RSS after the imports of each worker is reported so that the growth can be
read off. The two z maps are compared (max |Δz|) as a sanity check.

Usage::

    python benchmarks/bench_meta.py [--n-synthetic 1000] [--workdir DIR] [--keep]

Effect-size fan-in, ``--effect N``: N synthetic one-sample t maps (cycled from a pool
of ``--pool`` distinct maps, so that writing the inputs stays cheap; every map is still read and
decoded from its own file path), each with its z-map, g and var(g) files as the z-map job writes
them. Side by side, each in a fresh subprocess: nvmeta ``dersimonian_laird`` (all outputs incl.
the jackknife), nvmeta ``stouffer`` (all outputs) and NiMARE's ``FixedEffectsHedges`` (t maps +
sample sizes, Wald z; ``--no-nimare`` skips it)::

    python benchmarks/bench_meta.py --effect 1000 --pool 50
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

from nvmeta.testing import demo_pain_maps as pain_maps  # noqa: E402
from nvmeta.workflow.config import defaults


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# ---------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------


def _write_qc(d: Path, rows: list[dict]) -> None:
    import pandas as pd

    pd.DataFrame(rows).to_csv(d / "qc.tsv", sep="\t", index=False)


def prepare_pain(d: Path) -> None:
    import nibabel as nib
    import numpy as np

    from nvmeta.images.stats import t_to_z
    from nvmeta.images.template import load_mask

    if (d / "qc.tsv").is_file():
        return
    d.mkdir(parents=True, exist_ok=True)
    mask_img = load_mask("mni152_2mm")
    mask = np.asarray(mask_img.dataobj) > 0
    rows = []
    for i, (f, n) in enumerate(pain_maps()):
        img = nib.load(f)
        t = np.asarray(img.dataobj, dtype=np.float64)
        z = t_to_z(t, n - 1).astype(np.float32)
        z[t == 0] = np.nan
        # exact copy onto the mask grid (same voxel centres, x flipped, shifted)
        m = np.linalg.inv(img.affine) @ mask_img.affine
        ijk = np.indices(mask.shape).reshape(3, -1)
        src = np.round(m[:3, :3] @ ijk + m[:3, 3:4]).astype(int)
        ok = np.all((src >= 0) & (src < np.array(z.shape)[:, None]), axis=0)
        out = np.full(ijk.shape[1], np.nan, np.float32)
        out[ok] = z[src[0, ok], src[1, ok], src[2, ok]]
        out = out.reshape(mask.shape)
        out[~mask] = np.nan
        image_id = 1000 + i
        nib.save(nib.Nifti1Image(out, mask_img.affine), d / f"{image_id}.nii.gz")
        rows.append(
            {"image_id": image_id, "collection_id": 1425, "number_of_subjects": n, "status": "included"}
        )
    _write_qc(d, rows)


def prepare_synthetic(d: Path, n_maps: int, seed: int = 0) -> None:
    import nibabel as nib
    import numpy as np
    from scipy.ndimage import gaussian_filter

    from nvmeta.images.template import load_mask

    if (d / "qc.tsv").is_file() and len(list(d.glob("*.nii.gz"))) == n_maps:
        return
    d.mkdir(parents=True, exist_ok=True)
    mask_img = load_mask("mni152_2mm")
    mask = np.asarray(mask_img.dataobj) > 0
    rng = np.random.default_rng(seed)
    ijk = np.indices(mask.shape, dtype=np.float32)
    centre = np.array([30, 60, 40], dtype=np.float32)[:, None, None, None]
    blob = np.exp(-np.sum((ijk - centre) ** 2, axis=0) / (2 * 4.0**2)).astype(np.float32)
    rows = []
    t0 = time.perf_counter()
    for i in range(n_maps):
        noise = gaussian_filter(rng.standard_normal(mask.shape, dtype=np.float32), 2.0)
        noise /= noise[mask].std()
        z = np.where(mask, noise + rng.uniform(0.0, 1.0) * blob, np.nan).astype(np.float32)
        nib.save(nib.Nifti1Image(z, mask_img.affine), d / f"{i + 1}.nii.gz")
        rows.append(
            {
                "image_id": i + 1,
                "collection_id": i + 1,
                "number_of_subjects": int(rng.integers(10, 60)),
                "status": "included",
            }
        )
    _write_qc(d, rows)
    print(f"  wrote {n_maps} synthetic maps in {time.perf_counter() - t0:.0f} s", flush=True)


# ---------------------------------------------------------------------------------------
# workers (run in a subprocess each)
# ---------------------------------------------------------------------------------------


def worker_nvmeta(data: Path, out: Path) -> dict:
    from nvmeta.images.template import load_mask
    from nvmeta.meta import run_method

    mask_img = load_mask("mni152_2mm")
    base = _rss_mb()
    t0 = time.perf_counter()
    summary = run_method("stouffer", data / "qc.tsv", lambda i: data / f"{i}.nii.gz", mask_img, {}, out, None)
    wall = time.perf_counter() - t0
    return {
        "seconds": wall,
        "seconds_estimation": summary["seconds_estimation"],
        "peak_rss_mb": _rss_mb(),
        "baseline_rss_mb": base,
        "n_maps": summary["k_maps"],
    }


def worker_nimare(data: Path, out: Path, freeze_gc: bool = False) -> dict:
    import gc
    import warnings

    import nibabel as nib
    import numpy as np
    import pandas as pd
    from nimare.dataset import Dataset
    from nimare.meta.ibma import Stouffers

    from nvmeta.images.template import load_mask

    mask_img = load_mask("mni152_2mm")
    rows = pd.read_csv(data / "qc.tsv", sep="\t")
    if freeze_gc:  # nilearn's per-image gc.collect() otherwise walks the whole heap each time
        gc.freeze()
    base = _rss_mb()
    t0 = time.perf_counter()
    source = {
        f"study-{r.image_id}": {
            "contrasts": {"1": {"images": {"z": str((data / f"{r.image_id}.nii.gz").resolve())}}}
        }
        for r in rows.itertuples()
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dset = Dataset(source, target="mni152_2mm", mask=mask_img)
        res = Stouffers(groupby=False).fit(dset)
    wall = time.perf_counter() - t0
    z = res.get_map("z")
    nib.save(z, out / "nimare_z.nii.gz")
    ours = out / "z.nii.gz"
    diff = None
    if ours.is_file():
        a = np.asarray(nib.load(ours).dataobj, dtype=np.float64)
        b = np.asarray(z.dataobj, dtype=np.float64)
        both = np.isfinite(a) & np.isfinite(b) & (np.asarray(mask_img.dataobj) > 0)
        diff = float(np.max(np.abs(a[both] - b[both])))
    return {"seconds": wall, "peak_rss_mb": _rss_mb(), "baseline_rss_mb": base, "max_abs_dz_vs_nvmeta": diff}


def _run_worker(kind: str, data: Path, out: Path) -> dict:
    cmd = [sys.executable, __file__, "--worker", kind, "--data", str(data), "--out", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"{kind} worker failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def prepare_effect(d: Path, n_maps: int, pool: int, seed: int = 0) -> None:
    """Pool of one-sample t maps (+ z, g, var g, qc.json) and a qc.tsv of n_maps rows cycling over it."""
    import nibabel as nib
    import numpy as np
    from scipy.ndimage import gaussian_filter

    from nvmeta.images.effectsize import write_effect_maps
    from nvmeta.images.stats import t_to_z
    from nvmeta.images.template import load_mask

    if (d / "qc.tsv").is_file() and len(list(d.glob("pool/*/g.nii.gz"))) == pool:
        rows = sum(1 for _ in open(d / "qc.tsv")) - 1
        if rows == n_maps:
            return
    mask_img = load_mask("mni152_2mm")
    mask = np.asarray(mask_img.dataobj) > 0
    rng = np.random.default_rng(seed)
    ijk = np.indices(mask.shape, dtype=np.float32)
    centre = np.array([30, 60, 40], dtype=np.float32)[:, None, None, None]
    blob = np.exp(-np.sum((ijk - centre) ** 2, axis=0) / (2 * 6.0**2)).astype(np.float32)
    sizes = []
    t0 = time.perf_counter()
    for j in range(pool):
        n = int(rng.integers(15, 60))
        sizes.append(n)
        noise = gaussian_filter(rng.standard_normal(mask.shape, dtype=np.float32), 2.0)
        noise /= noise[mask].std()
        t = np.where(mask, noise + rng.uniform(0.3, 0.7) * np.sqrt(n) * blob, np.nan).astype(np.float32)
        pd_ = d / "pool" / str(j)
        pd_.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(t, mask_img.affine), pd_ / "t.nii.gz")
        z = np.where(mask, t_to_z(t.astype(np.float64), n - 1.0), np.nan).astype(np.float32)
        nib.save(nib.Nifti1Image(z, mask_img.affine), pd_ / "zmap.nii.gz")
        qc = {"n": n, "df": n - 1.0, "image_id": j, "collection_id": j}
        write_effect_maps(z, qc, {}, defaults("conversion"), mask_img, pd_ / "g.nii.gz", pd_ / "varg.nii.gz")
        (pd_ / "qc.json").write_text(json.dumps(qc))
    rows = [
        {
            "image_id": i + 1,
            "collection_id": i + 1,
            "number_of_subjects": sizes[i % pool],
            "status": "included",
        }
        for i in range(n_maps)
    ]
    _write_qc(d, rows)
    (d / "pool.json").write_text(json.dumps({"pool": pool}))
    print(f"  wrote a pool of {pool} maps (t, z, g, var g) in {time.perf_counter() - t0:.0f} s", flush=True)


def worker_effect(kind: str, data: Path, out: Path) -> dict:
    import numpy as np

    pool = json.loads((data / "pool.json").read_text())["pool"]
    base = _rss_mb()
    if kind in ("nvmeta_dl", "nvmeta_stouffer"):
        from nvmeta.images.template import load_mask
        from nvmeta.meta import run_method

        mask_img = load_mask("mni152_2mm")
        base = _rss_mb()
        method = "dersimonian_laird" if kind == "nvmeta_dl" else "stouffer"
        d = lambda i: data / "pool" / str((i - 1) % pool)  # noqa: E731
        t0 = time.perf_counter()
        s = run_method(
            method, data / "qc.tsv", lambda i: d(i) / "zmap.nii.gz", mask_img, {}, out, None,
            qc_json_for=lambda i: d(i) / "qc.json",
            effect_paths_for=lambda i: (d(i) / "g.nii.gz", d(i) / "varg.nii.gz"),
        )  # fmt: skip
        return {"seconds": time.perf_counter() - t0, "seconds_estimation": s["seconds_estimation"],
                "peak_rss_mb": _rss_mb(), "baseline_rss_mb": base, "n_maps": s["k_maps"]}  # fmt: skip
    import warnings

    import pandas as pd
    from nimare.dataset import Dataset
    from nimare.meta.ibma import FixedEffectsHedges

    from nvmeta.images.template import load_mask

    mask_img = load_mask("mni152_2mm")
    rows = pd.read_csv(data / "qc.tsv", sep="\t")
    base = _rss_mb()
    t0 = time.perf_counter()
    source = {
        f"study-{r.image_id}": {
            "contrasts": {"1": {
                "images": {"t": str((data / "pool" / str((r.image_id - 1) % pool) / "t.nii.gz").resolve())},
                "metadata": {"sample_sizes": [int(r.number_of_subjects)]},
            }}
        }
        for r in rows.itertuples()
    }  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dset = Dataset(source, target="mni152_2mm", mask=mask_img)
        res = FixedEffectsHedges(small_sample_correction="wald").fit(dset)
    wall = time.perf_counter() - t0
    z = np.asarray(res.get_map("z").dataobj, dtype=np.float64)
    return {
        "seconds": wall,
        "peak_rss_mb": _rss_mb(),
        "baseline_rss_mb": base,
        "finite_z": int(np.isfinite(z).sum()),
    }


def main_effect(args) -> None:
    work = args.workdir or Path(tempfile.mkdtemp(prefix="nvmeta_bench_effect_"))
    work.mkdir(parents=True, exist_ok=True)
    data = work / f"effect{args.effect}"
    print(f"work dir: {work}  (cpus: {os.cpu_count()})\npreparing data ...", flush=True)
    prepare_effect(data, args.effect, args.pool)
    kinds = ["nvmeta_stouffer", "nvmeta_dl"] + ([] if args.no_nimare else ["nimare_feh"])
    res = {}
    try:
        for kind in kinds:
            print(f"[{kind}] ...", flush=True)
            res[kind] = _run_worker(kind, data, work / f"out_{kind}")
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    st = res["nvmeta_stouffer"]
    print(
        f"\n{'run':<34}{'maps':>6}{'wall s':>9}{'est. s':>9}{'peak MB':>9}{'vs Stouffer':>13}{'mem vs Stouffer':>17}"
    )
    for kind, r in res.items():
        label = {"nvmeta_stouffer": "nvmeta stouffer (all outputs)", "nvmeta_dl": "nvmeta dersimonian_laird (all)",
                 "nimare_feh": "NiMARE FixedEffectsHedges (z, p)"}[kind]  # fmt: skip
        est = r.get("seconds_estimation")
        print(
            f"{label:<34}{args.effect:>6}{r['seconds']:>9.1f}{(est if est is not None else float('nan')):>9.1f}"
            f"{r['peak_rss_mb']:>9.0f}{r['seconds'] / st['seconds']:>12.2f}x{r['peak_rss_mb'] / st['peak_rss_mb']:>16.2f}x"
        )
    if "nimare_feh" in res:
        r = res["nimare_feh"]
        print(f"\nNiMARE FixedEffectsHedges / nvmeta DL: time {r['seconds'] / res['nvmeta_dl']['seconds']:.2f}x, "
              f"peak memory {r['peak_rss_mb'] / res['nvmeta_dl']['peak_rss_mb']:.2f}x")  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n-synthetic", type=int, default=1000)
    ap.add_argument("--workdir", type=Path, default=None, help="where the maps go (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--effect", type=int, default=0, help="effect-size fan-in benchmark on N maps")
    ap.add_argument("--pool", type=int, default=50, help="distinct synthetic maps behind --effect")
    ap.add_argument("--no-nimare", action="store_true", help="--effect: skip NiMARE FixedEffectsHedges")
    ap.add_argument(
        "--worker",
        choices=["nvmeta", "nimare", "nimare_frozen_gc", "nvmeta_dl", "nvmeta_stouffer", "nimare_feh"],
        help=argparse.SUPPRESS,
    )
    ap.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:
        args.out.mkdir(parents=True, exist_ok=True)
        if args.worker in ("nvmeta_dl", "nvmeta_stouffer", "nimare_feh"):
            print(json.dumps(worker_effect(args.worker, args.data, args.out)))
            return
        if args.worker == "nvmeta":
            res = worker_nvmeta(args.data, args.out)
        else:
            res = worker_nimare(args.data, args.out, freeze_gc=args.worker == "nimare_frozen_gc")
        print(json.dumps(res))
        return

    if args.effect:
        main_effect(args)
        return
    work = args.workdir or Path(tempfile.mkdtemp(prefix="nvmeta_bench_meta_"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"work dir: {work}  (cpus: {os.cpu_count()})", flush=True)
    datasets = {
        "pain21": work / "pain21",
        f"synthetic{args.n_synthetic}": work / f"synthetic{args.n_synthetic}",
    }
    print("preparing data ...", flush=True)
    prepare_pain(datasets["pain21"])
    prepare_synthetic(datasets[f"synthetic{args.n_synthetic}"], args.n_synthetic)

    results = {}
    try:
        for name, data in datasets.items():
            out = work / f"out_{name}"
            print(f"[{name}] nvmeta ...", flush=True)
            ours = _run_worker("nvmeta", data, out)
            print(f"[{name}] nimare ...", flush=True)
            theirs = _run_worker("nimare", data, out)
            print(f"[{name}] nimare (gc frozen) ...", flush=True)
            frozen = _run_worker("nimare_frozen_gc", data, out)
            results[name] = (ours, theirs, frozen)
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)

    print()
    header = (
        f"{'analysis':<18}{'maps':>6}  {'nvmeta s (est.)':>16}{'NiMARE s':>10}{'time ratio':>11}{'NiMARE* s':>10}"
        f"{'ratio*':>8}"
        f"{'nvmeta peak MB':>16}{'NiMARE peak MB':>16}{'mem ratio':>10}{'growth ratio':>13}{'max|dz|':>10}"
    )
    print(header)
    print("-" * len(header))
    for name, (ours, theirs, frozen) in results.items():
        grow_ours = ours["peak_rss_mb"] - ours["baseline_rss_mb"]
        grow_theirs = theirs["peak_rss_mb"] - theirs["baseline_rss_mb"]
        dz = theirs["max_abs_dz_vs_nvmeta"]
        print(
            f"{name:<18}{ours['n_maps']:>6}  "
            f"{ours['seconds']:>8.1f} ({ours['seconds_estimation']:>5.1f})"
            f"{theirs['seconds']:>10.1f}{theirs['seconds'] / ours['seconds']:>10.2f}x"
            f"{frozen['seconds']:>10.1f}{frozen['seconds'] / ours['seconds']:>7.2f}x"
            f"{ours['peak_rss_mb']:>16.0f}{theirs['peak_rss_mb']:>16.0f}"
            f"{theirs['peak_rss_mb'] / ours['peak_rss_mb']:>9.2f}x"
            f"{grow_theirs / max(grow_ours, 1.0):>12.1f}x"
            f"{dz if dz is not None else float('nan'):>10.1e}"
        )
    print(
        "\ntime ratio = NiMARE / nvmeta total (nvmeta total includes writing all maps, two cluster tables and the PNG;"
        "\n'est.' = reading + combining only). mem ratio = peak RSS NiMARE / nvmeta; growth ratio = the same for"
        "\nthe RSS growth above each worker's post-import baseline. NiMARE* = NiMARE with the heap frozen for the"
        "\ngarbage collector (nilearn runs gc.collect() per image; nvmeta does the same freeze around its nilearn calls)."
    )


if __name__ == "__main__":
    main()
