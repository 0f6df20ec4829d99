"""Benchmark: the meta job's cluster tables vs nilearn's ``get_clusters_table``.

On the demo's 21 pain maps (``bench_meta.prepare_pain``: t → z, MNI152 2 mm mask grid),
``nvmeta.meta.run_method("stouffer")`` writes the FDR and Bonferroni maps; then, in one process
after the imports, with the heap frozen as in the job (``nvmeta.meta.frozen_gc``), best of
``--repeat``:

- ``nvmeta``: :func:`nvmeta.meta.outputs.clusters_table` (two-sided, ``meta.min_cluster_voxels``),
  which calls nilearn once per cluster on the cluster's bounding box (:mod:`nvmeta.meta.clusters`);
- ``nilearn``: ``get_clusters_table`` on the full volume with the same threshold and
  ``cluster_threshold``, the call a job makes on the whole map.

The two tables are checked equal (coordinates, peak values, sizes, order).

Usage::

    python benchmarks/bench_clusters.py [--workdir DIR] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_meta import prepare_pain  # noqa: E402


def _best(fn, repeat: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()

    import nibabel as nib
    import numpy as np
    import pandas as pd
    from nilearn.reporting import get_clusters_table

    from nvmeta.images.template import load_mask
    from nvmeta.meta import frozen_gc, outputs, run_method
    from nvmeta.workflow.config import defaults

    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench_clusters_"))
    data = work / "pain21"
    prepare_pain(data)
    out = work / "stouffer"
    if not (out / "z_bonf.nii.gz").is_file():
        run_method(
            "stouffer", data / "qc.tsv", lambda i: data / f"{i}.nii.gz", load_mask("mni152_2mm"), {}, out
        )
    min_voxels = int(defaults("meta")["min_cluster_voxels"])
    print(f"load average {os.getloadavg()[0]:.2f} (2-core shared machine: compare the ratio)")
    for name in ("z_fdr", "z_bonf"):
        img = nib.load(out / f"{name}.nii.gz")
        img = nib.Nifti1Image(np.asarray(img.dataobj), img.affine)
        data0 = np.nan_to_num(np.asarray(img.dataobj, dtype=np.float32))
        thr = float(np.abs(data0[data0 != 0]).min()) * (1 - 1e-6)

        def ours(img=img):
            with frozen_gc():
                return outputs.clusters_table(img, True, min_voxels)

        def theirs(data0=data0, thr=thr, affine=img.affine):
            with frozen_gc(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return get_clusters_table(nib.Nifti1Image(data0, affine), stat_threshold=thr,
                                          cluster_threshold=min_voxels, two_sided=True)  # fmt: skip

        t_ours, a = _best(ours, args.repeat)
        t_ref, b = _best(theirs, args.repeat)
        cols = ["X", "Y", "Z", "Peak Stat"]
        pd.testing.assert_frame_equal(a[cols], b[cols])
        assert a["Cluster Size (mm3)"].astype(str).tolist() == b["Cluster Size (mm3)"].astype(str).tolist()
        sizes = pd.to_numeric(a["Cluster Size (voxels)"], errors="coerce")
        print(
            f"{name}: {outputs.n_clusters(a)} clusters (largest {int(sizes.max())} voxels), {len(a)} rows: "
            f"nvmeta {t_ours:.3f} s, nilearn full volume {t_ref:.3f} s, {t_ref / t_ours:.1f}x faster "
            "(tables equal)"
        )


if __name__ == "__main__":
    main()
