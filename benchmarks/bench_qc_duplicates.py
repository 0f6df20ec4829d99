"""QC duplicate search at scale: screened search (default) against all pairs computed exactly, side by side.

``K`` synthetic maps on the MNI152 2 mm mask's voxel count (smooth random fields, 0-20 % of voxels without
data, a few planted duplicates / sign flips / half-coverage copies), held in memory so only the search is
timed (the QC job also reads each zmap.nii.gz once). Both variants run in this process on the same maps:

- *all pairs exactly* (``exact_max_maps=K``): the previous default, shared-voxel Pearson r of every pair on
  every voxel (six chunked matrix products);
- *screened* (default): the same r on a 2,000-voxel subsample for every pair, exact check of candidates.

Both must return the same duplicates. Usage: ``python benchmarks/bench_qc_duplicates.py [--maps 400]``
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np


def synth(k: int, v: int, seed: int = 0) -> np.ndarray:
    from scipy.ndimage import gaussian_filter1d

    rng = np.random.default_rng(seed)
    maps = gaussian_filter1d(rng.normal(size=(k, v)).astype(np.float32), 4, axis=1)
    for i in range(k):
        cut = int(rng.integers(0, v // 5))
        maps[i, :cut] = np.nan
    maps[k // 2] = maps[3] * 2 + 1
    maps[k // 2 + 1] = -maps[7]
    maps[k // 2 + 2, : v // 2] = np.nan
    maps[k // 2 + 2, v // 2 :] = maps[11, v // 2 :]
    return maps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--maps", type=int, default=400)
    parser.add_argument("--voxels", type=int, default=228_483, help="default: MNI152 2 mm brain mask voxels")
    args = parser.parse_args()
    from nvmeta.qc import find_duplicates

    maps = synth(args.maps, args.voxels)
    print(f"{args.maps} maps x {args.voxels} voxels; load average {os.getloadavg()[0]:.1f}")
    res = {}
    for label, kw in (("screened (default)", {}), ("all pairs exactly", {"exact_max_maps": args.maps})):
        t0, c0 = time.perf_counter(), time.process_time()
        res[label] = find_duplicates(lambda i: maps[i].copy(), args.maps, **kw)
        res[label + " t"] = (time.perf_counter() - t0, time.process_time() - c0)
        print(
            f"{label:22s} wall {res[label + ' t'][0]:7.2f} s  cpu {res[label + ' t'][1]:7.2f} s  {res[label]}"
        )
    a, b = res["screened (default)"], res["all pairs exactly"]
    assert a.keys() == b.keys() and all(a[j][0] == b[j][0] for j in a), (a, b)
    wa, ca = res["screened (default) t"]
    wb, cb = res["all pairs exactly t"]
    print(f"ratio screened / exact: wall {wa / wb:.3f}x, cpu {ca / cb:.3f}x (same duplicates)")


if __name__ == "__main__":
    main()
