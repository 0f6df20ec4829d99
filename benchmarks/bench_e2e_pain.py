"""Cached end-to-end pain-21 meta-analysis (Stouffer + FDR + figures): nvmeta (Snakemake, 2 cores) vs one script.

Both start from the same downloaded data and run side by side in this run:

- **nvmeta**: a fresh copy of the workflow with the demo's pain analysis only (collection 1425 of the
  bundled snapshot ``tests/data/snapshot``: 21 pain T maps + one truncated upload; ``conversion.df: n-1``,
  ``meta: {methods: [stouffer], threshold: 3.0, cut_coords: [-20, -4, 6, 20, 40, 56]}``, no ICA). A first,
  untimed run downloads everything. Then the per-image outputs (``zmap.nii.gz``, ``qc.json``) and every
  fan-in output (``qc.tsv``, ``funnel.tsv``, ``meta/``, ``figures/``) are deleted, keeping the query's
  ``selection.tsv``, the downloads and the template mask, and ``python -m snakemake --cores 2`` is timed:
  22 zmap jobs, QC (duplicate search, funnel), the Stouffer fan-in (z, p, k, q, z_fdr, z_bonf maps, cluster
  tables, z mosaic) and the input glass brains. Interpreter start-up and DAG building are included.
- **script**: ``python baseline.py`` (written below, in a fresh interpreter, imports included), the steps the
  way nilearn's NeuroVault meta-analysis example (stop-go) and NiMARE users write them, over the same 21
  downloaded maps (``map_type == "T map"`` with a sample size and a readable file): load each map with
  nibabel, naive t -> z with scipy (``norm.isf(t.sf(t, df))``, df = n - 1), ``nilearn.image.resample_to_img``
  onto the MNI152 2 mm brain mask, ``np.sum(z) / sqrt(k)``, two-sided p, Benjamini-Hochberg FDR
  (``scipy.stats.false_discovery_control``), ``plot_stat_map`` mosaic of the thresholded z and a grid of
  ``plot_glass_brain`` of the inputs, z map saved.

Both results are compared (voxels significant at FDR 0.05) so the speed is not bought with a different answer.

``--clusters-probe`` also times the meta step alone (``nvmeta.meta.run_method``, in a fresh process, twice
each) with nilearn's ``get_clusters_table`` as nvmeta calls it and with ``cluster_threshold=10``, to show
what the cluster tables cost.

Usage: ``python benchmarks/bench_e2e_pain.py [--repeat 2] [--clusters-probe]``
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synth_snapshot import load_note, make_workdir, snakemake  # noqa: E402

from nvmeta.testing.workdir import REPO  # noqa: E402

CUTS = [-20, -4, 6, 20, 40, 56]

BASELINE = '''
"""The pain meta-analysis as one script, the way nilearn's example / NiMARE users write it."""
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import nibabel as nib
import numpy as np
from nilearn import datasets, image, plotting
from scipy import stats

images_dir, ids_file, out = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
GLASS = sys.argv[4] == "1"
out.mkdir(parents=True, exist_ok=True)
CUTS = %(cuts)r


def t_to_z(t_scores, deg_of_freedom):
    p_values = stats.t.sf(t_scores, df=deg_of_freedom)
    z_values = stats.norm.isf(p_values)
    return z_values


mask_img = datasets.load_mni152_brain_mask(resolution=2)
mask = mask_img.get_fdata() > 0
z_imgs, names = [], []
for image_id in ids_file.read_text().split():
    meta = json.loads((images_dir / image_id / "metadata.json").read_text())
    if meta["map_type"] != "T map" or not meta.get("number_of_subjects"):
        continue
    try:
        t_img = nib.load(images_dir / image_id / "map.nii.gz")
        t = t_img.get_fdata()
    except Exception:
        continue
    z = t_to_z(t, deg_of_freedom=meta["number_of_subjects"] - 1)
    z_img = image.new_img_like(t_img, z)
    z_imgs.append(image.resample_to_img(z_img, mask_img, copy_header=True, force_resample=True))
    names.append(meta["name"])

data = np.stack([img.get_fdata() for img in z_imgs], axis=-1)
k = data.shape[-1]
meta_z = np.sum(data, axis=-1) / np.sqrt(k)
meta_z[~mask] = 0
p = 2 * stats.norm.sf(np.abs(meta_z[mask]))
q = stats.false_discovery_control(p)
z_fdr = np.zeros_like(meta_z)
z_fdr[mask] = np.where(q < 0.05, meta_z[mask], 0)
meta_img = image.new_img_like(mask_img, meta_z)
nib.save(meta_img, out / "z.nii.gz")
nib.save(image.new_img_like(mask_img, z_fdr), out / "z_fdr.nii.gz")

display = plotting.plot_stat_map(meta_img, display_mode="z", cut_coords=CUTS, threshold=3.0,
                                 title=f"Stouffer: {k} maps")
display.savefig(out / "z.png", dpi=100)
display.close()

if GLASS:
    ncols = 6
    nrows = int(np.ceil(k / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(4 * ncols, 2 * nrows))
    for ax, z_img, name in zip(axes.ravel(), z_imgs, names):
        plotting.plot_glass_brain(z_img, figure=fig, axes=ax, threshold=3.0, plot_abs=False,
                                  colorbar=False, title=name[:20])
    for ax in axes.ravel()[k:]:
        ax.axis("off")
    fig.savefig(out / "inputs_glass_brain.png", dpi=50)
    plt.close(fig)
print(json.dumps({"k": k, "n_fdr": int((z_fdr != 0).sum())}))
'''


PROBE = """
import json, sys, time
from pathlib import Path
import nilearn.reporting
import nvmeta.meta as M
from nvmeta.template import load_mask
wf, variant, out = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
timing = {"clusters": 0.0}
stock = nilearn.reporting.get_clusters_table
def timed(*a, **kw):
    if variant == "min10":
        kw["cluster_threshold"] = 10
    t0 = time.perf_counter()
    try:
        return stock(*a, **kw)
    finally:
        timing["clusters"] += time.perf_counter() - t0
nilearn.reporting.get_clusters_table = timed
images = wf / "results" / "images"
cfg = {"threshold": 3.0, "cut_coords": %(cuts)r}
t0 = time.perf_counter()
s = M.run_method("stouffer", wf / "results/analyses/pain/qc.tsv", lambda i: images / str(i) / "zmap.nii.gz",
                 load_mask(str(wf / "results/template/mask.nii.gz")), cfg, out)
rows = sum(1 for _ in open(Path(out) / "clusters.tsv")) - 1
print(json.dumps({"secs": time.perf_counter() - t0, "clusters": timing["clusters"], "rows": rows,
                  "n_clusters_fdr": s["n_clusters_fdr"]}))
"""


def _clusters_probe(wf: Path, tmp: Path) -> None:
    """Time nvmeta.meta.run_method (stouffer, pain) with the stock cluster tables and with
    nilearn's ``cluster_threshold=10`` (clusters under 10 voxels left out of the tables)."""
    res = {}
    for variant in ("stock", "min10", "stock", "min10"):
        out = subprocess.run(
            [sys.executable, "-c", PROBE % {"cuts": CUTS}, str(wf), variant, str(tmp / f"probe_{variant}")],
            capture_output=True,
            text=True,
            check=True,
        )
        res.setdefault(variant, []).append(json.loads(out.stdout.strip().splitlines()[-1]))
    for variant, runs in res.items():
        r = runs[-1]
        print(
            f"  meta step in-process ({variant:5s}): {statistics.median(x['secs'] for x in runs):5.1f} s, of which "
            f"get_clusters_table {statistics.median(x['clusters'] for x in runs):5.1f} s; clusters.tsv "
            f"{r['rows']} rows ({r['n_clusters_fdr']} clusters)"
        )


def _clean(wf: Path, ids: list[int]) -> None:
    for i in ids:
        for name in ("zmap.nii.gz", "qc.json"):
            (wf / "results" / "images" / str(i) / name).unlink(missing_ok=True)
    a = wf / "results" / "analyses" / "pain"
    for name in ("qc.tsv", "funnel.tsv"):
        (a / name).unlink(missing_ok=True)
    for d in ("meta", "figures"):
        shutil.rmtree(a / d, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument(
        "--no-input-figures",
        action="store_true",
        help="leave out the input glass brains on both sides (automatic when the workflow's input_figures rule fails)",
    )
    p.add_argument(
        "--clusters-probe",
        action="store_true",
        help="also time the meta step in-process with nilearn's cluster tables as is and with cluster_threshold=10",
    )
    args = p.parse_args()
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        tmp = Path(tmp)
        wf = make_workdir(
            tmp / "wf",
            {
                "neurovault": {"url": str(REPO / "tests" / "data" / "snapshot"), "mode": "download_new"},
                "template": {"mask": "mni152_2mm"},
                "conversion": {"df": "n-1"},
                "analyses": {
                    "pain": {
                        "collection_ids": [1425],
                        "meta": {"methods": ["stouffer"], "threshold": 3.0, "cut_coords": CUTS},
                    }
                },
            },
        )
        glass = not args.no_input_figures
        a_dir = "results/analyses/pain"
        no_fig_targets = [f"{a_dir}/qc.tsv", f"{a_dir}/funnel.tsv"] + [
            f"{a_dir}/meta/stouffer/{n}" for n in ("z.nii.gz", "clusters.tsv", "z.png")
        ]
        targets: list[str] = [] if glass else no_fig_targets
        t_first, proc = snakemake(wf, *targets, cores=2, check=False)
        if proc.returncode != 0:
            if glass and "Error in rule input_figures" in proc.stdout:
                print(
                    "NOTE: the workflow's input_figures rule fails; both sides run without the input glass brains"
                )
                glass, targets = False, no_fig_targets
                t_first, proc = snakemake(wf, *targets, cores=2)
            else:
                raise RuntimeError(proc.stdout[-5000:])
        sel = wf / "results" / "analyses" / "pain" / "selection.tsv"
        ids = [int(line.split("\t")[0]) for line in sel.read_text().splitlines()[1:]]
        (tmp / "ids.txt").write_text("\n".join(map(str, ids)))
        (tmp / "baseline.py").write_text(BASELINE % {"cuts": CUTS})
        print(
            f"pain analysis: {len(ids)} selected images; first (downloading) nvmeta run {t_first:.1f} s; {load_note()}"
        )

        t_nv, t_bl = [], []
        for r in range(args.repeat):
            order = ["nvmeta", "script"] if r % 2 == 0 else ["script", "nvmeta"]
            for which in order:
                if which == "nvmeta":
                    _clean(wf, ids)
                    secs, proc = snakemake(wf, *targets, cores=2)
                    summary = json.loads(
                        (wf / "results/analyses/pain/meta/stouffer/summary.json").read_text()
                    )
                    n_jobs = proc.stdout.count("Finished job")
                    t_nv.append(secs)
                    print(
                        f"  run {r + 1} nvmeta  {secs:6.1f} s  ({n_jobs} jobs; {summary['k_maps']} maps, "
                        f"{summary['n_significant_fdr']} FDR voxels; meta job {summary['seconds']:.1f} s)",
                        flush=True,
                    )
                else:
                    t0 = time.perf_counter()
                    out = subprocess.run(
                        [
                            sys.executable,
                            str(tmp / "baseline.py"),
                            str(wf / "results" / "images"),
                            str(tmp / "ids.txt"),
                            str(tmp / f"baseline_out{r}"),
                            "1" if glass else "0",
                        ],
                        capture_output=True,
                        text=True,
                        check=True,
                    )
                    secs = time.perf_counter() - t0
                    res = json.loads(out.stdout.strip().splitlines()[-1])
                    t_bl.append(secs)
                    print(
                        f"  run {r + 1} script  {secs:6.1f} s  ({res['k']} maps, {res['n_fdr']} FDR voxels)",
                        flush=True,
                    )
        if args.clusters_probe:
            _clusters_probe(wf, tmp)
        a, b = statistics.median(t_nv), statistics.median(t_bl)
        print(
            f"cached pain-21 Stouffer+FDR+figures{'' if glass else ' (no input glass brains)'}: nvmeta snakemake --cores 2 {a:.1f} s vs in-process script "
            f"{b:.1f} s: ratio nvmeta/script {a / b:.2f}; {load_note()}"
        )


if __name__ == "__main__":
    main()
