"""Benchmark of the task atlas and decoding (nvmeta.decode): 5,000 synthetic maps in 20 tasks, 10 maps decoded.

Data (nvmeta.testing.tasks, not timed): on the real MNI152 2 mm brain mask, 20 tasks x 25 collections x
10 maps; each map is its task's planted signature (3 Gaussian blobs) + one pattern all maps share +
smooth noise, written as template-grid ``zmap.nii.gz`` files (what the atlas jobs read after the
per-image jobs). The analysis decoded: 10 held-out maps of 5 tasks (its result maps) whose selection
also holds 3 of the atlas' collections (2 of task 0, 1 of task 1), so the leave-out takes 30 maps out
of two references.

Stages, each in its own subprocess (wall time, and the process' own peak RSS,
``resource.getrusage(RUSAGE_SELF).ru_maxrss``), as the workflow runs them:

``atlas_term``         one job per term (:func:`nvmeta.decode.atlas.build_term`): reference map, sums,
                       voxel sample; run one after the other here, one SLURM job each in a real run.
``atlas_table``        the fan-in: ``atlas.tsv`` and ``atlas.png``.
``decode_references``  the analysis' leave-out references (:func:`nvmeta.decode.references.write_references`).
``decode``             r by NiMARE's ``CorrelationDecoder`` + the null (``n_null`` random references per
                       size on ``null_voxels`` voxels), decoding.tsv and decoding.png.

Baseline, side by side (the same work without the sums: what a user of NiMARE's decoders does to
leave an analysis' maps out): ``rebuild``, every term's reference recomputed from its maps that are
not the analysis' (reading the whole atlas again), checked equal to ``decode_references``' maps.

Usage::

    python benchmarks/bench_decode.py [--workdir DIR] [--n-null 1000] [--keep]

About 5 GB of disk for the maps (removed afterwards unless ``--keep``).
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

TASKS, COLLECTIONS, MAPS = 20, 25, 10
HELD_TASKS, HELD_MAPS = 5, 2
SEED = 0


def _names():
    from nvmeta.testing.tasks import task_names

    return task_names(TASKS)


def _base():
    from nvmeta.images.template import load_mask
    from nvmeta.testing.tasks import make_task_maps

    return make_task_maps(load_mask("mni152_2mm"), _names(), 0, 0, seed=SEED)


def _generate_part(root: str, part: int, n_parts: int) -> list[tuple[int, int, str, int]]:
    """Write the atlas maps of every ``n_parts``-th task (a worker process); returns their ids."""
    from nvmeta.testing.tasks import make_task_maps, write_zmap

    base = _base()
    out = []
    for t in range(part, TASKS, n_parts):
        ts = make_task_maps(base.mask_img, [_names()[t]], COLLECTIONS, MAPS, seed=100 + t, noise_pool=40,
                            first_id=100001 + t * COLLECTIONS * MAPS, first_cid=5001 + t * COLLECTIONS,
                            signatures_from=base, sink=lambda m: write_zmap(root, m, base.mask_img))  # fmt: skip
        out += [(m.image_id, m.collection_id, m.task, m.n) for m in ts.maps]
    return out


def generate(root: Path) -> dict:
    from concurrent.futures import ProcessPoolExecutor

    import pandas as pd

    from nvmeta.io import write_tsv
    from nvmeta.testing.tasks import make_task_maps, write_zmap

    t0 = time.perf_counter()
    with ProcessPoolExecutor(2) as ex:
        parts = list(ex.map(_generate_part, [str(root)] * 2, [0, 1], [2, 2]))
    maps = sorted(m for p in parts for m in p)
    base = _base()
    held = make_task_maps(base.mask_img, _names()[:HELD_TASKS], 1, HELD_MAPS, seed=999, first_id=900001,
                          first_cid=9001, signatures_from=base, noise_pool=8,
                          sink=lambda m: write_zmap(root, m, base.mask_img))  # fmt: skip
    d = root / "atlas"
    d.mkdir(parents=True, exist_ok=True)
    write_tsv(
        d / "groups.tsv",
        pd.DataFrame(maps, columns=["image_id", "collection_id", "term", "n"]).drop(columns="n"),
    )
    qc = pd.DataFrame(maps, columns=["image_id", "collection_id", "term", "n"]).drop(columns="term")
    qc["status"] = "included"
    write_tsv(d / "qc.tsv", qc)
    # the analysis: the held-out maps and 3 atlas collections (2 of task 0, 1 of task 1)
    cids = {5001, 5002, 5001 + COLLECTIONS}
    sel = [(m.image_id, m.collection_id) for m in held.maps] + [(i, c) for i, c, _, _ in maps if c in cids]
    a = root / "analyses" / "probe"
    a.mkdir(parents=True, exist_ok=True)
    write_tsv(a / "selection.tsv", pd.DataFrame(sel, columns=["image_id", "collection_id"]))
    (a / "truth.json").write_text(json.dumps({str(m.image_id): m.task for m in held.maps}))
    return {"maps": len(maps), "seconds": time.perf_counter() - t0}


def _atlas_cfg(n_null_voxels: int = 10000) -> dict:
    from nvmeta.workflow.config import defaults

    return {**defaults("atlas"), "null_voxels": n_null_voxels}


def _paths(root: Path):
    return lambda i: root / "images" / str(i) / "zmap.nii.gz"


def stage(name: str, root: Path, arg: str) -> dict:
    """One measured stage (run in a subprocess by :func:`measure`)."""
    import logging

    from nvmeta.decode import atlas as atlas_mod
    from nvmeta.decode.terms import read_members, read_terms, write_terms
    from nvmeta.images.template import load_mask

    log = logging.getLogger("bench")
    d, a = root / "atlas", root / "analyses" / "probe"
    mask = load_mask("mni152_2mm")
    atlas = _atlas_cfg()
    out: dict = {}
    if name == "atlas_terms":
        write_terms(d / "groups.tsv", d / "qc.tsv", atlas["min_maps"], atlas["min_collections"], d / "terms.tsv",
                    d / "members.tsv")  # fmt: skip
    elif name == "atlas_term":
        names = dict(zip(*(read_terms(d / "terms.tsv")[c] for c in ("slug", "term")), strict=True))
        members = read_members(d / "members.tsv")[arg]
        atlas_mod.build_term(names[arg], arg, members, _paths(root), mask, atlas, d / arg, log)
        out["maps"] = len(members)
    elif name == "atlas_table":
        (d / "query_funnel.json").write_text("{}")
        slugs = read_members(d / "members.tsv")
        atlas_mod.write_atlas_table(d / "terms.tsv", [d / s / "summary.json" for s in slugs], d / "atlas.tsv",
                                    d / "atlas.png", d / "query_funnel.json")  # fmt: skip
    elif name == "decode_references":
        from nvmeta.decode.references import write_references

        df = write_references(a / "selection.tsv", d / "atlas.tsv", read_members(d / "members.tsv"),
                              lambda s: d / s / "z.nii.gz", lambda s: d / s / "sums.npz", _paths(root), mask, atlas,
                              "collections", a / "decode/references.tsv", a / "decode/references")  # fmt: skip
        out["recomputed"] = int((df["n_left_out"] > 0).sum())
        out["left_out_maps"] = int(df["n_left_out"].sum())
    elif name == "decode":
        from nvmeta.decode.decoding import decode_analysis
        from nvmeta.workflow.config import defaults

        truth = json.loads((a / "truth.json").read_text())
        sources = [(f"map/{i}", _paths(root)(int(i))) for i in truth]
        slugs = read_members(d / "members.tsv")
        df = decode_analysis(sources, a / "decode/references.tsv", a / "selection.tsv",
                             [d / s / "sample.npz" for s in slugs], mask, atlas,
                             {**defaults("decode"), "n_null": int(arg)}, a / f"decode/decoding_{arg}.tsv",
                             a / f"decode/decoding_{arg}.png", a / f"decode/summary_{arg}.json")  # fmt: skip
        top = df[df["rank"] == 1].set_index("source")
        out["top1_correct"] = int(sum(top.loc[f"map/{i}", "term"] == t for i, t in truth.items()))
        out["max_p_true"] = float(max(df[(df["source"] == f"map/{i}") & (df["term"] == t)]["p_null"].iloc[0]
                                      for i, t in truth.items()))  # fmt: skip
    elif name == "rebuild":
        out.update(_rebuild(root, mask, atlas))
    out["maxrss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def _rebuild(root: Path, mask, atlas) -> dict:
    """Baseline: every term's reference from its maps that are not the analysis' (the whole atlas read)."""
    import nibabel as nib
    import pandas as pd

    from nvmeta.decode.references import leave_out_sets
    from nvmeta.decode.sums import Sums
    from nvmeta.decode.terms import read_members
    from nvmeta.meta.units import load_vector, mask_data

    d, a = root / "atlas", root / "analyses" / "probe"
    mask_img, m = mask_data(mask)
    images, collections = leave_out_sets(a / "selection.tsv", "collections")
    refs = pd.read_csv(a / "decode/references.tsv", sep="\t", keep_default_na=False)
    worst, read = 0.0, 0
    for slug, members in read_members(d / "members.tsv").items():
        sums = Sums.empty(atlas["method"], int(m.sum()))
        for i, c, _ in members:
            if i in images or c in collections:
                continue
            sums.add(load_vector(_paths(root)(i), mask_img, m))
            read += 1
        z = sums.reference(atlas["min_fraction"])
        ours = np.asarray(nib.load(refs.set_index("slug").loc[slug, "map"]).dataobj, dtype=np.float64)[m]
        both = np.isfinite(z) & np.isfinite(ours)
        if not np.array_equal(np.isfinite(z), np.isfinite(ours)):
            raise AssertionError(f"{slug}: voxels with a value differ")
        worst = max(worst, float(np.max(np.abs(z[both] - ours[both]))))
    return {"maps_read": read, "max_abs_diff": worst}


def measure(name: str, root: Path, arg: str = "") -> dict:
    cmd = [sys.executable, __file__, "--stage", name, "--workdir", str(root), "--arg", arg]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONWARNINGS="ignore"))
    secs = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"stage {name} failed:\n{proc.stderr[-4000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["seconds"] = secs
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--n-null", type=int, default=1000)
    p.add_argument("--keep", action="store_true")
    p.add_argument("--stage", default=None)
    p.add_argument("--arg", default="")
    a = p.parse_args(argv)
    if a.stage:
        print(json.dumps(stage(a.stage, a.workdir, a.arg)))
        return
    root = Path(tempfile.mkdtemp(prefix="bench_decode_", dir=a.workdir))
    la = os.getloadavg()
    print(f"load average {la[0]:.1f}/{la[1]:.1f}/{la[2]:.1f} on {os.cpu_count()} cores; workdir {root}")
    try:
        g = generate(root)
        print(
            f"generated {g['maps']} maps in {TASKS} tasks (+{HELD_TASKS * HELD_MAPS} held out) in {g['seconds']:.0f} s"
        )
        t = measure("atlas_terms", root)
        print(f"atlas_terms          {t['seconds']:7.1f} s  {t['maxrss_mb']:6.0f} MB")
        from nvmeta.decode.terms import read_members

        jobs = [measure("atlas_term", root, s) for s in sorted(read_members(root / "atlas/members.tsv"))]
        secs = [j["seconds"] for j in jobs]
        print(f"atlas_term x {len(jobs)}      {sum(secs):7.1f} s in all ({min(secs):.1f}-{max(secs):.1f} s per job of "
              f"{jobs[0]['maps']} maps), peak {max(j['maxrss_mb'] for j in jobs):.0f} MB per job")  # fmt: skip
        t = measure("atlas_table", root)
        print(f"atlas_table          {t['seconds']:7.1f} s  {t['maxrss_mb']:6.0f} MB")
        r = measure("decode_references", root)
        print(f"decode_references    {r['seconds']:7.1f} s  {r['maxrss_mb']:6.0f} MB  ({r['recomputed']} references "
              f"recomputed, {r['left_out_maps']} maps left out)")  # fmt: skip
        b = measure("rebuild", root)
        print(f"baseline rebuild     {b['seconds']:7.1f} s  {b['maxrss_mb']:6.0f} MB  ({b['maps_read']} maps read; "
              f"max |diff| vs decode_references {b['max_abs_diff']:.2e})")  # fmt: skip
        print(f"  leave-out references: nvmeta {r['seconds']:.1f} s vs rebuild {b['seconds']:.1f} s = "
              f"{b['seconds'] / r['seconds']:.1f}x faster")  # fmt: skip
        for n_null in (10, a.n_null):
            dd = measure("decode", root, str(n_null))
            print(f"decode n_null={n_null:<6d} {dd['seconds']:7.1f} s  {dd['maxrss_mb']:6.0f} MB  (top-1 correct "
                  f"{dd['top1_correct']}/10, largest p of the true task {dd['max_p_true']:.4f})")  # fmt: skip
    finally:
        if not a.keep:
            shutil.rmtree(root, ignore_errors=True)
        la = os.getloadavg()
        print(f"load average {la[0]:.1f}/{la[1]:.1f}/{la[2]:.1f} at the end")


if __name__ == "__main__":
    main()
