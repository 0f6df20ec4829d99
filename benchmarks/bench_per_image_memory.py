"""Peak memory of one z-map job on a map that is small on disk but large decoded.

Builds a gzipped NIfTI whose header says ``SHAPE`` voxels of ``DTYPE`` (a smooth blob of t values in a
constant field, ``--background``, so every voxel has data yet the file is a few MB), then runs ``make_zmap`` on it in a fresh subprocess
(template: the ``mni152_2mm`` mask, read from a file as the rule does, off the template lattice so the interpolation path runs) and prints the
subprocess's peak RSS (``VmHWM``), the RSS after imports and mask loading (baseline) and the
status/reason. The rule declares ``mem_mb = 1500``.

``--pythonpath DIR`` runs another nvmeta checkout side by side (e.g. ``git archive <old commit> nvmeta
workflow/schemas | tar -x -C /tmp/old`` for the before figure). ``--max-map-mb`` overrides
``qc.max_map_mb`` (the default excludes a 400^3 map before reading it).

Usage: ``python benchmarks/bench_per_image_memory.py [--shape 400 400 400] [--dtype float64]
[--max-map-mb 1000] [--pythonpath DIR]``
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np

JOB = r"""
import json, sys

def hwm():  # this process's peak RSS in MB (VmHWM: unlike getrusage's ru_maxrss it does not
    # include the parent's size at fork, which Linux carries over exec)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
from nvmeta.images.template import load_mask
from nvmeta.images.zmap import make_zmap
import nvmeta.images.resample, nvmeta.images.stats, scipy.ndimage  # everything a job imports, before the baseline
meta, src, out, limits, mask_path = sys.argv[1:6]
mask = load_mask(mask_path)  # as the rule does: the template rule's mask file
from nvmeta.workflow.config import defaults
base = hwm()
conversion = {**defaults("conversion"), "df": "n-2"}
limits = defaults("qc") if limits == "none" else {**defaults("qc"), **json.loads(limits)}
qc = make_zmap(meta, src, mask, conversion, out + "/zmap.nii.gz", out + "/qc.json", limits)
peak = hwm()
print(json.dumps({"baseline_mb": base, "peak_mb": peak, "status": qc["status"], "reason": qc["reason"]}))
"""


def make_map(path: Path, shape: tuple[int, int, int], dtype: str, voxel_mm: float, background: float) -> int:
    """Write the test map; return its file size in bytes."""
    data = np.full(shape, background, dtype=dtype)
    c = [s // 2 for s in shape]
    r = max(2, min(shape) // 8)
    g = np.linspace(-2, 2, 2 * r)
    blob = np.exp(-(g[:, None, None] ** 2 + g[None, :, None] ** 2 + g[None, None, :] ** 2)) * 8.0
    data[c[0] - r : c[0] + r, c[1] - r : c[1] + r, c[2] - r : c[2] + r] = blob
    aff = np.diag([voxel_mm, voxel_mm, voxel_mm, 1.0])
    aff[:3, 3] = [-voxel_mm * c[0] + 0.3, -voxel_mm * c[1] + 0.3, -voxel_mm * c[2] + 0.3]  # off-lattice
    img = nib.Nifti1Image(data, aff)
    img.header.set_data_dtype(dtype)
    nib.save(img, path)
    return path.stat().st_size


def run_job(pythonpath: str, meta: Path, src: Path, out: Path, limits: str, mask: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=pythonpath)
    res = subprocess.run(
        [sys.executable, "-c", JOB, str(meta), str(src), str(out), limits, str(mask)],
        env=env,
        cwd=out,  # not the repository: `python -c` puts the cwd first on sys.path
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=3, default=[400, 400, 400])
    parser.add_argument("--dtype", default="float64")
    parser.add_argument("--voxel-mm", type=float, default=0.5)
    parser.add_argument("--max-map-mb", type=float, default=None)
    parser.add_argument(
        "--background",
        type=float,
        default=0.5,
        help="value outside the blob (0: no data there; 0.5: data everywhere)",
    )
    parser.add_argument("--pythonpath", default=str(Path(__file__).resolve().parents[1]))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        src = tmp / "map.nii.gz"
        size = make_map(src, tuple(args.shape), args.dtype, args.voxel_mm, args.background)
        meta = tmp / "metadata.json"
        meta.write_text(
            json.dumps(
                {
                    "id": 1,
                    "collection_id": 1,
                    "map_type": "T map",
                    "number_of_subjects": 20,
                    "nvmeta": {"status": "ok", "reason": None},
                }
            )
        )
        limits = "none" if args.max_map_mb is None else json.dumps({"max_map_mb": args.max_map_mb})
        from nvmeta.images.template import load_mask

        mask = tmp / "mask.nii.gz"
        nib.save(load_mask("mni152_2mm"), mask)
        r = run_job(args.pythonpath, meta, src, tmp, limits, mask)
        n_vox = int(np.prod(args.shape))
        print(
            f"map {'x'.join(map(str, args.shape))} {args.dtype}: file {size / 1e6:.1f} MB, decodes to "
            f"{n_vox * np.dtype(args.dtype).itemsize / 1e6:.0f} MB; nvmeta from {args.pythonpath}"
        )
        print(
            f"peak RSS {r['peak_mb']:.0f} MB (baseline after imports + mask {r['baseline_mb']:.0f} MB, "
            f"job {r['peak_mb'] - r['baseline_mb']:.0f} MB = {(r['peak_mb'] - r['baseline_mb']) * 1e6 / n_vox:.1f} "
            f"B/voxel); declared mem_mb 1500; {r['status']} {r['reason'] or ''}"
        )


if __name__ == "__main__":
    main()
