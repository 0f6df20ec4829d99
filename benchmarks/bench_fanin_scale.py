"""Fan-ins at scale: QC, every meta-analysis method and ICA on 2,000 / 5,000 / 20,000 maps.

For each number of maps N and each fan-in, one fresh subprocess runs the fan-in's ``nvmeta``
function exactly as its rule calls it, with all its outputs (tables, maps, figures), and reports
its wall time and peak resident memory (``getrusage``: the process and its children), printed
next to the ``mem_mb`` the rule declares for N maps (the formulas of ``workflow/rules/*.smk``,
read from the Snakefile so that they cannot drift) and the time per map, so that growth with N
can be read off.

Inputs, on the MNI152 2 mm template grid (235,375 voxels), written once under ``--workdir``:

- a pool of ``--pool`` one-sample t maps (smooth noise plus a blob; n between 15 and 60) with the
  z, g and var(g) files and qc.json the z-map job writes (``bench_meta.prepare_effect``); the meta
  methods read N maps cycling over that pool (every map is still read and decoded from a file);
- for QC and ICA, whose results depend on maps being distinct (QC's duplicate search would
  exclude copies; ICA would see a rank-``pool`` matrix), N distinct z-map files: pool map
  ``i % pool`` plus half of another pool map rolled by a random offset (pairwise r about 0.8, no
  duplicate), each with its qc.json and metadata.json.

Usage::

    python benchmarks/bench_fanin_scale.py --sizes 2000 5000 [--fanins qc stouffer ...]
        [--workdir /tmp/fanin] [--pool 100]

The number of maps changes what is slow: permutation multiplies ``n_perm`` sign flips by the
maps (one pass over the maps per 570 permutations); the robust estimators sort every voxel's N
values.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))

METHODS = [
    "stouffer",
    "weighted_stouffer",
    "fisher",
    "ttest",
    "permutation",
    "dersimonian_laird",
    "hedges",
    "fixed_effects_hedges",
    "median",
    "trimmed_mean",
]
FANINS = ["qc", *METHODS, "ica"]


# ---------------------------------------------------------------------------------------------
# declared memory: the rules' own formulas


def declared_mem_mb(fanin: str, n: int) -> int:
    """``mem_mb`` of the fan-in's rule for ``n`` maps, evaluated from the rule file's lambda."""
    rules = REPO / "workflow" / "rules"
    if fanin == "qc":
        text, rule = (rules / "qc.smk").read_text(), "qc"
    elif fanin == "ica":
        text, rule = (rules / "ica.smk").read_text(), "ica"
    else:
        effect = fanin in METHODS[METHODS.index("dersimonian_laird") :]
        text, rule = (rules / "meta.smk").read_text(), "meta_effect" if effect else "meta"
    start = text.index(f"rule {rule}:")
    if re.match(r".*?mem_mb=meta_mem_mb,", text[start:], re.S):  # the z methods (helpers/meta.smk)
        from nvmeta.meta.budget import permutation_memory_bytes
        from nvmeta.workflow.config import defaults

        if fanin != "permutation":
            return 2000
        return 2000 + permutation_memory_bytes(n, 235_375, defaults("meta")["n_perm"]) // 2**20
    m = re.search(r"mem_mb=(lambda wildcards, input:.*?),\n\s+runtime=", text[start:], re.S)
    expr = m.group(1)

    class _Input:
        zmaps = [None] * n
        qcjson = [None] * n

    class _Wildcards:
        method = fanin

    from nvmeta.images.qc import DUPLICATE_SEARCH_BYTES

    scope = {"DUPLICATE_SEARCH_BYTES": DUPLICATE_SEARCH_BYTES}  # what qc.smk imports
    return int(eval("(" + expr + ")", scope)(_Wildcards, _Input))  # the repository's own rule text


# ---------------------------------------------------------------------------------------------
# inputs


def prepare_distinct(root: Path, pool_dir: Path, n: int, seed: int = 1) -> Path:
    """N distinct z-map image directories (zmap.nii.gz, qc.json, metadata.json) and a selection.tsv."""
    import nibabel as nib
    import numpy as np
    import pandas as pd
    from bench_qc_duplicates import zmap_qc_record

    from nvmeta.images.template import load_mask

    d = root / f"distinct_{n}"
    if (d / "selection.tsv").is_file():
        return d
    mask_img = load_mask("mni152_2mm")
    inside = np.asarray(mask_img.dataobj) > 0
    pool = sorted(pool_dir.glob("pool/*/zmap.nii.gz"), key=lambda p: int(p.parent.name))
    base = np.stack([np.asarray(nib.load(p).dataobj, dtype=np.float32)[inside] for p in pool])
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    rows = []
    for i in range(n):
        image_id = 100_000 + i
        z = base[i % len(pool)] + 0.5 * np.roll(
            base[rng.integers(len(pool))], int(rng.integers(1, inside.sum()))
        )
        vol = np.full(inside.shape, np.nan, dtype=np.float32)
        vol[inside] = z
        out = d / "images" / str(image_id)
        out.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(vol, mask_img.affine), out / "zmap.nii.gz")
        qc = zmap_qc_record(z, collection_id=1 + i // 10, image_id=image_id)
        (out / "qc.json").write_text(json.dumps(qc))
        meta = {
            "id": image_id,
            "collection_id": 1 + i // 10,
            "name": f"map {i}",
            "contrast_definition": ["pain > rest", "faces > houses", "2-back > 0-back"][i % 3],
            "cognitive_paradigm_cogatlas": ["pain monitor", "face recognition", "n-back"][i % 3],
            "nvmeta": {"status": "ok"},
        }
        (out / "metadata.json").write_text(json.dumps(meta))
        rows.append({"image_id": image_id, "collection_id": 1 + i // 10, "number_of_subjects": 20})
        if (i + 1) % 1000 == 0:
            print(f"  {i + 1} of {n} distinct maps written ({time.perf_counter() - t0:.0f} s)", flush=True)
    pd.DataFrame(rows).to_csv(d / "selection.tsv", sep="\t", index=False)
    return d


def prepare_cycled(root: Path, n: int, pool: int) -> Path:
    """The pool of t / z / g / var(g) maps and a qc.tsv of ``n`` included rows cycling over it."""
    from bench_meta import prepare_effect

    d = root / f"cycled_{n}"
    if not (d / "qc.tsv").is_file():
        prepare_effect(d, n, pool)
    return d


# ---------------------------------------------------------------------------------------------
# one fan-in in its own process


def worker(fanin: str, data: Path, out: Path, threads: int) -> dict:
    import logging

    from nvmeta.images.template import load_mask
    from nvmeta.workflow.config import defaults

    logging.basicConfig(level=logging.WARNING, format="    [%(name)s] %(levelname)s %(message)s")
    log = logging.getLogger(f"nvmeta.bench.{fanin}")
    mask_img = load_mask("mni152_2mm")
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    result: dict = {}
    if fanin == "qc":
        from nvmeta.images.qc import write_qc

        qc, _ = write_qc(
            data / "selection.tsv",
            lambda i: data / "images" / str(i),
            defaults("qc"),
            out / "qc.tsv",
            out / "funnel.tsv",
            logger=log,
            mask_img=mask_img,
        )
        result["included"] = int((qc["status"] == "included").sum())
    elif fanin == "ica":
        import pandas as pd

        from nvmeta.ica import run_ica

        qc = pd.read_csv(data / "selection.tsv", sep="\t").assign(status="included")
        qc.to_csv(out / "qc.tsv", sep="\t", index=False)
        s = run_ica(
            out / "qc.tsv",
            lambda i: data / "images" / str(i) / "zmap.nii.gz",
            lambda i: data / "images" / str(i) / "metadata.json",
            mask_img,
            defaults("ica"),
            out,
            log,
            threads=threads,
        )
        result["converged"] = s.get("converged") if isinstance(s, dict) else None
    else:
        from nvmeta.meta import run_method

        pool = json.loads((data / "pool.json").read_text())["pool"]

        def d(i: int) -> Path:
            return data / "pool" / str((i - 1) % pool)

        params = defaults("meta")
        s = run_method(
            fanin,
            data / "qc.tsv",
            lambda i: d(i) / "zmap.nii.gz",
            mask_img,
            params,
            out,
            log,
            n_jobs=threads,
            qc_json_for=lambda i: d(i) / "qc.json",
            effect_paths_for=lambda i: (d(i) / "g.nii.gz", d(i) / "varg.nii.gz"),
        )
        result["k_maps"] = s.get("k_maps")
    result["seconds"] = time.perf_counter() - t0
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    result["peak_rss_mb"] = max(own, kids) / 1024.0
    return result


def run_one(fanin: str, data: Path, out: Path, threads: int) -> dict:
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", fanin, str(data), str(out), "--threads", str(threads)],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
    sys.stderr.write(proc.stderr)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[2000, 5000, 20000])
    p.add_argument("--fanins", nargs="+", choices=FANINS, default=FANINS)
    p.add_argument("--pool", type=int, default=100)
    p.add_argument(
        "--threads", type=int, default=1, help="threads per fan-in (the rules' default is 1; permutation 2)"
    )
    p.add_argument("--workdir", type=Path, default=Path("/tmp/nvmeta-fanin"))
    p.add_argument("--worker", nargs=3, metavar=("FANIN", "DATA", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        fanin, data, out = args.worker
        print(json.dumps(worker(fanin, Path(data), Path(out), args.threads)))
        return
    args.workdir.mkdir(parents=True, exist_ok=True)
    print(
        f"bench_fanin_scale: sizes {args.sizes}; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
    )
    print("| maps | fan-in | wall s | s per 1,000 maps | peak RSS MB | declared mem_mb | result |")
    print("|---|---|---|---|---|---|---|")
    for n in args.sizes:
        cycled = prepare_cycled(args.workdir, n, args.pool)
        distinct = None
        for fanin in args.fanins:
            if fanin in ("qc", "ica"):
                distinct = distinct or prepare_distinct(args.workdir, cycled, n)
                data = distinct
            else:
                data = cycled
            threads = 2 if fanin == "permutation" and args.threads == 1 else args.threads
            r = run_one(fanin, data, args.workdir / "out" / f"{fanin}_{n}", threads)
            if "error" in r:
                print(
                    f"| {n:,} | {fanin} | failed: {r['error']} | | | {declared_mem_mb(fanin, n):,} | |",
                    flush=True,
                )
                continue
            extra = {k: v for k, v in r.items() if k not in ("seconds", "peak_rss_mb")}
            print(
                f"| {n:,} | {fanin} | {r['seconds']:.1f} | {1000 * r['seconds'] / n:.1f} | "
                f"{r['peak_rss_mb']:,.0f} | {declared_mem_mb(fanin, n):,} | {extra} |",
                flush=True,
            )
        print(f"(load average after {n:,} maps: {os.getloadavg()[0]:.1f})", flush=True)


if __name__ == "__main__":
    main()
