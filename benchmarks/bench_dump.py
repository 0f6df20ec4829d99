"""Selection from a full-size NeuroVault database export: nvmeta's dump source vs pandas by hand.

Both run in a fresh Python process each (wall and CPU time from process start to the selection in
memory, peak RSS from ``getrusage(RUSAGE_CHILDREN)``; CPU time is the figure to read on a loaded
machine), on the same synthetic export
(``benchmarks/synth_dump.py``, 560,000 statistic maps by default, generated once and reused):

- **nvmeta**: ``DumpSource(dump)`` + ``nvmeta.select.query.select`` with nilearn's default terms and
  ``image_terms: {map_type: T map, analysis_level: group, modality: fMRI-BOLD}``, ``max_images: all``
  (the worst case: every public map is examined), the funnel included.
- **pandas by hand** (the OHBM 2025 IBMA tutorial's way): read the four tables from the archive
  with pandas (every column), merge, keep public collections, filter on the codes
  (``map_type == "T"``, ``analysis_level == "G"``, modality, not thresholded, MNI).

The two selections must be the same ids in the same order (checked).

Usage: ``python benchmarks/bench_dump.py [--n-maps 560000] [--dump PATH] [--repeat 1]``
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

NVMETA = r"""
import json, logging, sys, time
t0 = time.perf_counter()
from nvmeta.neurovault.dump import DumpSource
from nvmeta.select.query import analysis_selection, select
from nvmeta.workflow.config import defaults
cfg = {**analysis_selection({**defaults("analysis"), "image_terms": {"map_type": "T map", "analysis_level": "group",
                                                                       "modality": "fMRI-BOLD"}}), "max_images": None}
src = DumpSource(sys.argv[1], "https://neurovault.org/media/", cfg["image_terms"].keys(),
                 max_field_bytes=defaults("neurovault")["max_dump_field_bytes"])
t1 = time.perf_counter()
records, funnel = select(src, cfg, logging.getLogger("bench"))
t2 = time.perf_counter()
json.dump({"ids": [r["id"] for r in records], "load": t1 - t0, "select": t2 - t1,
           "examined": funnel["images_examined"]}, open(sys.argv[2], "w"))
"""

PANDAS = r"""
import json, sys, tarfile, time
t0 = time.perf_counter()
import pandas as pd
with tarfile.open(sys.argv[1]) as tar:
    def read(name):
        m = next(m for m in tar.getmembers() if m.name.endswith("/" + name))
        return pd.read_csv(tar.extractfile(m), dtype=str, keep_default_na=False)
    col = read("statmaps_collection.csv")
    item = read("statmaps_basecollectionitem.csv")
    img = read("statmaps_image.csv")
    stat = read("statmaps_statisticmap.csv")
public = col.loc[col["private"] == "f", ["id", "number_of_images"] if "number_of_images" in col else ["id"]]
df = stat.merge(img, left_on="image_ptr_id", right_on="basecollectionitem_ptr_id").merge(
    item, left_on="image_ptr_id", right_on="id")
df = df[df["collection_id"].isin(public["id"])]
df = df[(df["map_type"] == "T") & (df["analysis_level"] == "G") & (df["modality"] == "fMRI-BOLD")
        & (df["is_thresholded"] == "f") & (df["not_mni"] == "f")]
df = df.assign(cid=df["collection_id"].astype(int), iid=df["id"].astype(int)).sort_values(["cid", "iid"])
t1 = time.perf_counter()
json.dump({"ids": df["iid"].tolist(), "load": t1 - t0, "select": 0.0, "examined": None}, open(sys.argv[2], "w"))
"""


def run(code: str, dump: Path, out: Path) -> dict:
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    before = ru0.ru_maxrss
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", code, str(dump), str(out)], check=True, env=dict(os.environ))
    secs = time.perf_counter() - t0
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    peak = ru1.ru_maxrss  # KiB, max over children so far
    cpu = ru1.ru_utime + ru1.ru_stime - ru0.ru_utime - ru0.ru_stime
    res = json.loads(out.read_text())
    res.update(seconds=secs, cpu=cpu, peak_mb=peak / 1024, peak_is_max_so_far=peak == before)
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-maps", type=int, default=560_000)
    p.add_argument("--dump", type=Path, default=None, help="reuse (or write) the synthetic dump here")
    p.add_argument("--repeat", type=int, default=1)
    args = p.parse_args()
    from synth_dump import write_synthetic_dump

    dump = args.dump or Path(f"/tmp/nvmeta_bench_dump_{args.n_maps}.tar.gz")
    if not dump.exists():
        t0 = time.perf_counter()
        write_synthetic_dump(dump, args.n_maps, max(1, args.n_maps // 40))
        print(f"wrote {dump} ({dump.stat().st_size / 1e6:.0f} MB) in {time.perf_counter() - t0:.0f} s")
    out = dump.with_suffix(".result.json")
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = float("nan")
    print(f"dump {dump} ({dump.stat().st_size / 1e6:.0f} MB), {args.n_maps} maps; load {load:.1f}")
    # nvmeta first: RUSAGE_CHILDREN's peak is a running maximum, so the leaner run goes first
    for r in range(args.repeat):
        nv = run(NVMETA, dump, out)
        pdh = run(PANDAS, dump, out)
        assert nv["ids"] == pdh["ids"], "the two selections differ"
        print(
            f"  run {r + 1}: nvmeta {nv['seconds']:.1f} s wall, {nv['cpu']:.1f} s CPU (read {nv['load']:.1f} s, "
            f"select {nv['select']:.1f} s wall; "
            f"{nv['examined']} maps examined, {len(nv['ids'])} selected), peak RSS {nv['peak_mb']:.0f} MB; "
            f"pandas by hand {pdh['seconds']:.1f} s wall, {pdh['cpu']:.1f} s CPU, peak RSS {pdh['peak_mb']:.0f} MB"
            + (" (not above nvmeta's: its own peak is at most this)" if pdh["peak_is_max_so_far"] else "")
            + f"; ratio nvmeta/pandas: wall {nv['seconds'] / pdh['seconds']:.2f}, CPU {nv['cpu'] / pdh['cpu']:.2f}"
        )


if __name__ == "__main__":
    main()
