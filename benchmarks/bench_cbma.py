"""CBMA benchmarks, each stage in a fresh subprocess (peak RSS = that stage's).

1. Peak extraction per map: ``nvmeta.cbma.extract_peaks`` vs nilearn's ``get_clusters_table``
   called on the full volume (the same peaks; nvmeta calls it once per cluster on the cluster's
   bounding box), on planted maps with smooth noise (many clusters, like real group maps).
2. CBMA fan-in vs NiMARE by hand on the same peaks: ``nvmeta.cbma.estimate.run_cbma`` (whole job:
   Dataset, fit, Monte-Carlo FWE, every map written, cluster table, figure) vs the NiMARE
   tutorial's recipe (Dataset from the peaks, ``fit``, ``FWECorrector.transform``,
   ``save_maps``), timed after imports in both.
3. Memory of the CBMA fan-in at ``--experiments`` experiments (default 1,000, ~50 foci each as
   the demo's pain maps) and of the peak extraction over ``--maps`` maps (streaming: flat).

Usage::

    python benchmarks/bench_cbma.py [--maps 40] [--baseline-maps 3] [--experiments 1000] [--n-iters 20]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

_SETUP = textwrap.dedent(
    """
    import gc, json, resource, sys, time, warnings
    from pathlib import Path
    import numpy as np, nibabel as nib
    warnings.simplefilter("ignore")
    sys.path.insert(0, {repo!r})
    from nvmeta.workflow.config import defaults
    from nvmeta.images.template import load_mask
    mask_img = load_mask("mni152_2mm")
    work = Path({work!r})
    def rss_mb():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    """
)

_MAKE_MAPS = """
from scipy import ndimage
from nvmeta.testing.planted import write_planted
qc = write_planted(work / "results", mask_img, n_images={n}, noise=0.0)
rng = np.random.default_rng(0)
mask = np.asarray(mask_img.dataobj) > 0
for i in range({n}):
    p = work / "results" / "images" / str(1000 + i) / "zmap.nii.gz"
    z = np.asarray(nib.load(p).dataobj, dtype=np.float32)
    s = ndimage.gaussian_filter(rng.standard_normal(mask.shape), 2.0)
    z = np.where(mask, np.nan_to_num(z) + 1.8 * s / s.std(), np.nan).astype(np.float32)
    nib.save(nib.Nifti1Image(z, mask_img.affine), p)
print(json.dumps({{"ok": True}}))
"""

_PEAKS_NVMETA = """
from nvmeta import cbma
root = work / "results"
qc = root / "analyses" / "planted" / "qc.tsv"
cfg = defaults("cbma")
t0 = time.perf_counter()
table = cbma.peaks_table(qc, lambda i: root / "images" / str(i) / "zmap.nii.gz",
                         lambda i: root / "images" / str(i) / "qc.json", cfg, work / "peaks.tsv")
dt = time.perf_counter() - t0
print(json.dumps({{"seconds": dt, "n_peaks": len(table), "rss_mb": rss_mb()}}))
"""

_PEAKS_NILEARN = """
from nilearn.reporting import get_clusters_table
root = work / "results"
thr = float(np.nextafter(np.float32(3.1), np.float32(0)))
n_rows = 0
gc.freeze()
t0 = time.perf_counter()
for i in range({n}):  # the first n maps only: one call on the full volume takes seconds
    img = nib.load(root / "images" / str(1000 + i) / "zmap.nii.gz")
    data = np.nan_to_num(np.asarray(img.dataobj, dtype=np.float32))
    t = get_clusters_table(nib.Nifti1Image(data, img.affine), stat_threshold=thr,
                           cluster_threshold=10, two_sided=True, min_distance=8.0)
    n_rows += len(t)
dt = time.perf_counter() - t0
print(json.dumps({{"seconds": dt, "n_peaks": n_rows, "rss_mb": rss_mb()}}))
"""

_MAKE_PEAKS = """
import pandas as pd
from nvmeta.cbma import PEAK_COLUMNS
rng = np.random.default_rng(1)
mask = np.asarray(mask_img.dataobj) > 0
ijk = np.argwhere(mask)
rows = []
centres = np.array([[40, -20, 10], [-40, -20, 10], [2, 10, 40], [-56, -24, 20], [6, -20, 4]], float)
for e in range({n}):
    n_foci = 50
    pick = ijk[rng.integers(0, len(ijk), n_foci - 5)]
    xyz = np.vstack([centres + rng.normal(0, 4, centres.shape),
                     pick @ mask_img.affine[:3, :3].T + mask_img.affine[:3, 3]])
    for k, (x, y, z) in enumerate(xyz):
        rows.append([e, e, "positive", str(k + 1), x, y, z, 4.0, 50, int(rng.integers(12, 40))])
pd.DataFrame(rows, columns=PEAK_COLUMNS).to_csv(work / "peaks_{n}.tsv", sep="\\t", index=False)
print(json.dumps({{"ok": True}}))
"""

_CBMA_NVMETA = """
import nimare.correct, nimare.meta.cbma, nilearn.plotting, nilearn.reporting
from nvmeta.cbma.estimate import run_cbma
cfg = {{**defaults("cbma"), "n_iters": {iters}, "study": "image"}}
t0 = time.perf_counter()
s = run_cbma({method!r}, work / "peaks_{n}.tsv", mask_img, cfg, work / "nvmeta_{method}_{n}")
dt = time.perf_counter() - t0
print(json.dumps({{"seconds": dt, "fit": s["seconds_fit"], "fwe": s["seconds_fwe"], "rss_mb": rss_mb()}}))
"""

_CBMA_HAND = """
import pandas as pd
import nimare.correct, nimare.meta.cbma
from nimare.dataset import Dataset
from nimare.correct import FWECorrector
from nimare.meta.cbma import ALE, MKDADensity, KDA
t0 = time.perf_counter()
peaks = pd.read_csv(work / "peaks_{n}.tsv", sep="\\t")
peaks = peaks[peaks["sign"] == "positive"]
source = {{}}
for image_id, g in peaks.groupby("image_id"):
    source[str(image_id)] = {{"contrasts": {{"1": {{
        "coords": {{"space": "MNI", "x": g.x.tolist(), "y": g.y.tolist(), "z": g.z.tolist()}},
        "metadata": {{"sample_sizes": [int(g.sample_size.iloc[0])]}}}}}}}}
dset = Dataset(source, target="mni152_2mm", mask=mask_img)
est = {{"ale": ALE, "mkda": MKDADensity, "kda": KDA}}[{method!r}](random_state=0)
t_fit = time.perf_counter()
res = est.fit(dset)
t_fwe = time.perf_counter()
cres = FWECorrector(method="montecarlo", voxel_thresh=0.001, n_iters={iters}).transform(res)
t_done = time.perf_counter()
cres.save_maps(output_dir=str(work / "hand_{method}_{n}"))
dt = time.perf_counter() - t0
print(json.dumps({{"seconds": dt, "fit": t_fwe - t_fit, "fwe": t_done - t_fwe, "rss_mb": rss_mb()}}))
"""


def _run(work: Path, body: str, **fmt) -> dict:
    code = _SETUP.format(repo=str(REPO), work=str(work)) + body.format(**fmt)
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--maps", type=int, default=40)
    parser.add_argument(
        "--baseline-maps", type=int, default=3, help="maps of the nilearn full-volume baseline"
    )
    parser.add_argument("--experiments", type=int, default=1000)
    parser.add_argument("--small", type=int, default=21, help="experiments of the nvmeta-vs-hand run")
    parser.add_argument("--n-iters", type=int, default=20)
    parser.add_argument("--method", default="ale", choices=["ale", "mkda", "kda"])
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench_cbma_") as tmp:
        work = Path(tmp)
        _run(work, _MAKE_MAPS, n=args.maps)
        nv = _run(work, _PEAKS_NVMETA)
        ni = _run(work, _PEAKS_NILEARN, n=args.baseline_maps)
        per_nv = nv["seconds"] / args.maps
        per_ni = ni["seconds"] / args.baseline_maps
        print(
            f"peaks, {args.maps} maps: nvmeta {1000 * per_nv:.0f} ms/map "
            f"({nv['n_peaks'] / args.maps:.0f} peaks/map, peak RSS {nv['rss_mb']:.0f} MB) | nilearn "
            f"get_clusters_table on the full volume ({args.baseline_maps} maps) {1000 * per_ni:.0f} ms/map "
            f"({ni['n_peaks'] / args.baseline_maps:.0f} rows/map) | nvmeta {per_ni / per_nv:.1f}x faster",
            flush=True,
        )
        for n in (args.small, args.experiments):
            _run(work, _MAKE_PEAKS, n=n)
            a = _run(work, _CBMA_NVMETA, n=n, iters=args.n_iters, method=args.method)
            b = _run(work, _CBMA_HAND, n=n, iters=args.n_iters, method=args.method)
            print(
                f"cbma {args.method}, {n} experiments x 50 foci, n_iters={args.n_iters}: nvmeta job "
                f"{a['seconds']:.1f} s (fit {a['fit']:.1f} s, FWE {a['fwe']:.1f} s, peak RSS {a['rss_mb']:.0f} MB)"
                f" | NiMARE by hand {b['seconds']:.1f} s (fit {b['fit']:.1f} s, FWE {b['fwe']:.1f} s, "
                f"peak RSS {b['rss_mb']:.0f} MB) | ratio {a['seconds'] / b['seconds']:.2f}x",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
