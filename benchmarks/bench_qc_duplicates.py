"""QC duplicate search at scale: screened search (default) against all pairs computed exactly, side by side.

``K`` synthetic maps on the MNI152 2 mm mask's voxel count (smooth random fields, 0-20 % of voxels without
data, a few planted duplicates / sign flips / half-coverage copies), held in memory so only the search is
timed (the QC job also reads each zmap.nii.gz once). Both variants run in this process on the same maps:

- *all pairs exactly* (``exact_max_maps=K``): the previous default, shared-voxel Pearson r of every pair on
  every voxel (six chunked matrix products);
- *screened* (default): the same r on a 2,000-voxel subsample for every pair, exact check of candidates.

Both must return the same duplicates. Usage: ``python benchmarks/bench_qc_duplicates.py [--maps 400]``

``--job [--pythonpath DIR ...]``: the whole QC table job instead (``nvmeta.images.qc.build_qc`` on ``K`` written
``zmap.nii.gz`` files on the MNI 2 mm template with their qc.json/metadata.json: reading every map once plus
the search), in a fresh process per nvmeta checkout given (default: this one), wall seconds each.
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


def zmap_qc_record(z: np.ndarray, collection_id: int, **extra) -> dict:
    """The qc.json of an included z map (as the z-map job writes it) for map values ``z`` (NaN = no data)."""
    fin = z[np.isfinite(z)]
    return {
        "status": "included",
        "reason": None,
        "coverage": float(np.isfinite(z).mean()),
        "max_abs_z": float(np.abs(fin).max()),
        "z_min": float(fin.min()),
        "z_max": float(fin.max()),
        "df": None,
        "df_source": "z map",
        "n": 20,
        "n_source": "number_of_subjects",
        "collection_id": collection_id,
        **extra,
    }


JOB = r"""
import sys, time
from pathlib import Path
from nvmeta.images.qc import build_qc
from nvmeta.images.template import load_mask
root = Path(sys.argv[1])
mask = load_mask(str(root / "mask.nii.gz"))
t0 = time.perf_counter()
qc, _ = build_qc(root / "selection.tsv", lambda i: root / "images" / str(i), None, mask_img=mask)
print(time.perf_counter() - t0, int((qc["status"] == "included").sum()), sorted(qc.loc[qc["reason"].notna(), "image_id"]))
"""


def job(args) -> None:
    import json
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    import nibabel as nib
    import pandas as pd

    from nvmeta.images.template import load_mask

    mask_img = load_mask("mni152_2mm")
    inside = np.asarray(mask_img.dataobj) > 0
    maps = synth(args.maps, int(inside.sum()))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        nib.save(mask_img, root / "mask.nii.gz")
        rows = []
        for i in range(args.maps):
            image_id = 1000 + i
            d = root / "images" / str(image_id)
            d.mkdir(parents=True)
            vol = np.full(inside.shape, np.nan, dtype=np.float32)
            vol[inside] = maps[i] * 2
            nib.save(nib.Nifti1Image(vol, mask_img.affine), d / "zmap.nii.gz")
            (d / "qc.json").write_text(json.dumps(zmap_qc_record(maps[i] * 2, collection_id=1)))
            (d / "metadata.json").write_text(json.dumps({"id": image_id, "nvmeta": {"status": "ok"}}))
            rows.append({"image_id": image_id, "collection_id": 1, "number_of_subjects": 20})
        pd.DataFrame(rows).to_csv(root / "selection.tsv", sep="\t", index=False)
        import os

        print(f"QC job, {args.maps} zmap files; load average {os.getloadavg()[0]:.1f}")
        for path in args.pythonpath or [str(Path(__file__).resolve().parents[1])]:
            env = dict(os.environ, PYTHONPATH=path)
            out = subprocess.run(
                [sys.executable, "-c", JOB, str(root)],
                env=env,
                cwd=root,
                capture_output=True,
                text=True,
                check=True,
            ).stdout.split(maxsplit=2)
            print(
                f"nvmeta from {path}: build_qc {float(out[0]):.1f} s, {out[1]} included, excluded {out[2].strip()}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--maps", type=int, default=400)
    parser.add_argument("--voxels", type=int, default=228_483, help="default: MNI152 2 mm brain mask voxels")
    parser.add_argument("--job", action="store_true", help="time the whole QC table job on written files")
    parser.add_argument("--pythonpath", nargs="*", help="nvmeta checkouts to run the job with (with --job)")
    args = parser.parse_args()
    if args.job:
        job(args)
        return
    from nvmeta.images.qc import find_duplicates

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
