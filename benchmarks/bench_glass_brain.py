"""Benchmark: the inputs' glass-brain grid (nvmeta.figures.glass) vs one ``plot_glass_brain`` figure per map.

On the demo's 21 pain maps (``bench_meta.prepare_pain``: t → z on the MNI152 2 mm mask grid; 3-view
panels) and on 50 (the 21 repeated: ``figures.glass_brain_max_maps``' default, the most the grid draws;
axial panels beyond 24 maps), in
one process after the imports, best of ``--repeat``, CPU and wall time:

- ``nvmeta``: :func:`nvmeta.figures.glass.glass_brain_grid`, every panel drawn by nilearn's
  ``plot_glass_brain`` into an Axes of one figure, one shared colour scale, one PNG;
- ``per-map figures``: what a nilearn user writes: ``plot_glass_brain`` of each map in a figure of its
  own (same panel size, arguments and shared limit), saved as one PNG each.

Run it with ``PYTHONPATH`` at another checkout to time that checkout's grid against the same baseline.

Usage::

    python benchmarks/bench_glass_brain.py [--workdir DIR] [--repeat 3] [--maps 21 50]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_meta import prepare_pain  # noqa: E402


def _best(fn, repeat: int) -> tuple[float, float]:
    """Best wall and best CPU seconds of ``repeat`` calls."""
    walls, cpus = [], []
    for _ in range(repeat):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    return min(walls), min(cpus)


def per_map_figures(items, out_dir: Path, vmax: float, threshold: float = 3.0) -> None:
    """The baseline: one ``plot_glass_brain`` figure per map, of a grid panel's size and display mode
    (up to 24 maps 3 views in 4.6 x 1.8 in, beyond that the axial view in 2.0 x 2.2 in)."""
    import matplotlib.pyplot as plt
    import nibabel as nib
    import numpy as np
    from nilearn import plotting

    from nvmeta.meta import frozen_gc

    mode = "ortho" if len(items) <= 24 else "z"
    size = (4.6, 1.8) if mode == "ortho" else (2.0, 2.2)
    with frozen_gc():
        for k, (_, _, path) in enumerate(items):
            img = nib.load(path)
            data = np.asarray(img.dataobj, dtype=np.float32)
            fig = plt.figure(figsize=size)
            plotting.plot_glass_brain(
                nib.Nifti1Image(np.where(np.isfinite(data), data, 0).astype(np.float32), img.affine),
                figure=fig, display_mode=mode, threshold=threshold, plot_abs=False, colorbar=False,
                cmap="RdBu_r", vmin=-vmax, vmax=vmax, annotate=False, black_bg=False, symmetric_cbar=False,
            )  # fmt: skip
            fig.savefig(out_dir / f"{k}.png", dpi=100)
            plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--maps", type=int, nargs="+", default=[21, 50])
    args = ap.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import nilearn.plotting  # noqa: F401  (imported before timing, as in the job)
    import pandas as pd

    from nvmeta.figures.plotting import glass_brain_grid

    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench_glass_"))
    data = work / "pain21"
    prepare_pain(data)
    qc = pd.read_csv(data / "qc.tsv", sep="\t")
    base = [
        (int(i), f"pain map {k + 1:02d}", data / f"{int(i)}.nii.gz") for k, i in enumerate(qc["image_id"])
    ]
    print(f"load average {os.getloadavg()[0]:.1f} {os.getloadavg()[1]:.1f} {os.getloadavg()[2]:.1f}")
    for n in args.maps:
        items = [base[k % len(base)] for k in range(n)]
        out = work / f"grid_{n}.png"
        g_wall, g_cpu = _best(
            lambda items=items, out=out: glass_brain_grid(items, out, suptitle="bench"), args.repeat
        )
        per = work / f"per_map_{n}"
        per.mkdir(exist_ok=True)
        b_wall, b_cpu = _best(lambda items=items, per=per: per_map_figures(items, per, 6.0), args.repeat)
        print(
            f"{n} maps: grid {g_wall:.1f} s wall / {g_cpu:.1f} s CPU; per-map figures {b_wall:.1f} s / {b_cpu:.1f} s; "
            f"ratio (CPU) {g_cpu / b_cpu:.2f}x"
        )
    print(f"load average {os.getloadavg()[0]:.1f} {os.getloadavg()[1]:.1f} {os.getloadavg()[2]:.1f}")


if __name__ == "__main__":
    main()
