"""Per-image overhead inside Snakemake: marginal wall time of a zmap job vs the bare in-process make_zmap.

Complements ``bench_per_image.py`` (a fresh interpreter per image vs in-process): here the per-image jobs
run the way nvmeta runs them, ``run:`` jobs of the ``zmap`` rule under the default profile
(``force-use-threads``: in a thread of the Snakemake process), and the overhead of Snakemake's own
bookkeeping per job (scheduling, output checks, metadata/log files) is included.

Set-up: a synthetic snapshot (``synth_snapshot.py``: N images, mixed grids, 2 mm maps take the lattice fast
path, 3 mm and 1.5 mm maps nilearn's linear interpolation), downloaded beforehand (targets
``metadata.json`` + the template mask). Then, side by side, alternating order between repeats:

- **nvmeta**: ``snakemake --cores C <zmap.nii.gz of N0 images>`` and ``... <zmap.nii.gz of all N images>``
  (per-image outputs deleted before each); per-image cost = ``(T_N - T_N0) / (N - N0)``, i.e. the fixed
  start-up (interpreter, imports, DAG, template rule check) cancels out.
- **in-process**: ``nvmeta.images.zmap.make_zmap`` on the same N maps in this process (modules imported and mask
  loaded beforehand, one warm-up call), mean per image.

Usage: ``python benchmarks/bench_per_image_snakemake.py [--n-images 100] [--n0 4] [--cores 1 2] [--repeat 1]``
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synth_snapshot import load_note, make_snapshot, make_workdir, snakemake  # noqa: E402

from nvmeta.workflow.config import defaults


def _clean(wf: Path, ids: list[int]) -> None:
    for i in ids:
        for name in ("zmap.nii.gz", "qc.json"):
            (wf / "results" / "images" / str(i) / name).unlink(missing_ok=True)


def _inprocess(wf: Path, ids: list[int], out: Path) -> float:
    from nvmeta.images.template import load_mask
    from nvmeta.images.zmap import make_zmap

    mask = load_mask(str(wf / "results" / "template" / "mask.nii.gz"))
    conv = {"df": "n-2", "df_images": {}, "n_images": {}, "df_collections": {}, "n_collections": {}}
    out.mkdir(parents=True, exist_ok=True)

    def one(i: int) -> dict:
        d = wf / "results" / "images" / str(i)
        return make_zmap(
            d / "metadata.json",
            d / "map.nii.gz",
            mask,
            {**defaults("conversion"), **conv},
            out / f"{i}.nii.gz",
            out / f"{i}.json",
            defaults("qc"),
        )

    one(ids[0])  # warm-up: nilearn import for the first interpolated map, caches
    t0 = time.perf_counter()
    n_inc = sum(one(i)["status"] == "included" for i in ids)
    secs = time.perf_counter() - t0
    assert n_inc > 0.8 * len(ids), n_inc
    return secs / len(ids)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-images", type=int, default=100)
    p.add_argument("--n0", type=int, default=4)
    p.add_argument("--cores", type=int, nargs="*", default=[1, 2])
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--workdir", type=Path, default=None)
    args = p.parse_args()
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        tmp = Path(tmp)
        snap = make_snapshot(tmp / "snap", args.n_images, pool=50, seed=0)
        ids = snap["image_ids"]
        wf = make_workdir(
            tmp / "wf",
            {
                "neurovault": {"url": str(snap["root"].resolve()), "mode": "download_new"},
                "template": {"mask": "mni152_2mm"},
                "analyses": {"bench": {"image_ids": ids}},
            },
        )
        snakemake(
            wf, "results/template/mask.nii.gz", *[f"results/images/{i}/metadata.json" for i in ids], cores=2
        )
        grids = {}
        for f in snap["pool"]:
            grids[f["grid"]] = grids.get(f["grid"], 0) + 1
        print(f"{len(ids)} images downloaded (pool grids {grids}); {load_note()}", flush=True)
        small = [f"results/images/{i}/zmap.nii.gz" for i in ids[: args.n0]]
        full = [f"results/images/{i}/zmap.nii.gz" for i in ids]
        res: dict[str, list[float]] = {"inproc": []}
        for r in range(args.repeat):
            steps = ["snakemake", "inproc"] if r % 2 == 0 else ["inproc", "snakemake"]
            for step in steps:
                if step == "inproc":
                    per = _inprocess(wf, ids, tmp / f"inproc{r}")
                    res["inproc"].append(per)
                    print(f"  run {r + 1} in-process make_zmap: {per * 1000:.0f} ms per image", flush=True)
                    continue
                for c in args.cores:
                    _clean(wf, ids)
                    t_small, _ = snakemake(wf, *small, cores=c)
                    _clean(wf, ids)
                    t_full, _ = snakemake(wf, *full, cores=c)
                    per = (t_full - t_small) / (len(ids) - args.n0)
                    res.setdefault(f"cores{c}", []).append(per)
                    print(
                        f"  run {r + 1} snakemake --cores {c}: {args.n0} jobs {t_small:.1f} s, {len(ids)} jobs "
                        f"{t_full:.1f} s -> {per * 1000:.0f} ms per image (marginal)",
                        flush=True,
                    )
        base = statistics.median(res["inproc"])
        for c in args.cores:
            per = statistics.median(res[f"cores{c}"])
            print(
                f"per-image zmap: nvmeta in snakemake --cores {c} {per * 1000:.0f} ms/image (marginal wall) vs "
                f"in-process make_zmap {base * 1000:.0f} ms/image: ratio {per / base:.2f}; {load_note()}"
            )


if __name__ == "__main__":
    main()
