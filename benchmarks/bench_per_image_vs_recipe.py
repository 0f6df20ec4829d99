"""Per-image z-map cost: nvmeta's ``make_zmap`` against the seed example's per-map recipe, side by side.

The recipe is what a user would otherwise run per map (nilearn's NeuroVault stop-go example):
``load_img``, the naive ``norm.isf(t.sf(t, df))`` on every voxel, ``new_img_like`` and
``resample_to_img`` onto the MNI152 2 mm mask (its default, continuous interpolation). nvmeta's job does
more: reads the metadata, resolves n/df, checks the values, resamples (NaN-aware), converts t -> z exactly,
masks, and writes ``zmap.nii.gz`` + ``qc.json``. Both run in this process, every module imported and the
mask loaded already, alternating per repeat; CPU (user + sys of this process) and wall medians per map.

Maps (from the repository's demo snapshot, ``tests/data/snapshot``): pain_01 (T, 91x109x91 2 mm LAS: on the
template lattice, no interpolation), the same map with its affine shifted by 0.7 mm (off the lattice:
interpolated), pain_02 put on a 1.5 mm grid (nearest neighbour: interpolated onto the template), image 10426
(T, 3 mm 53x63x46: interpolated), image 990033 (T, Analyze 79x95x78 2 mm, on the
lattice) and the motor Z map 396069 (lattice).

Usage: ``python benchmarks/bench_per_image_vs_recipe.py [--repeat 7]``
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

SNAPSHOT = Path(__file__).resolve().parents[1] / "tests" / "data" / "snapshot"
MAPS = {  # image id: (label, number_of_subjects used when the record has none)
    990001: ("pain_01 (T, 2 mm lattice)", None),
    10426: ("image 10426 (T, 3 mm)", 20),
    990033: ("image 990033 (T, Analyze 2 mm lattice)", None),
    -990001: ("pain_01 shifted 0.7 mm (T, off-lattice)", None),
    -990002: ("pain_02 at 1.5 mm (T, 121x145x121)", None),
    396069: ("image 396069 (Z, 2 mm lattice)", 20),
}


def recipe(path: Path, df: float | None, mask_img) -> object:
    """The stop-go example's per-map steps, as written there (plus resample_to_img onto the mask)."""
    import scipy.stats
    from nilearn.image import load_img, new_img_like, resample_to_img

    img = load_img(os.fspath(path))
    data = img.get_fdata()
    if df is not None:
        data = scipy.stats.norm.isf(scipy.stats.t.sf(data, df=df))
    z_img = new_img_like(img, data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return resample_to_img(z_img, mask_img)


def _timed(fn) -> tuple[float, float]:
    c0, t0 = time.process_time(), time.perf_counter()
    fn()
    return time.perf_counter() - t0, time.process_time() - c0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()

    from nvmeta.images.template import load_mask
    from nvmeta.images.zmap import LIMIT_KEYS, make_zmap
    from nvmeta.workflow.config import defaults

    manifest = {
        m["image_id"]: SNAPSHOT / m["path"] for m in json.loads((SNAPSHOT / "MANIFEST.json").read_text())
    }
    mask = load_mask("mni152_2mm")
    limits = {k: defaults("qc")[k] for k in LIMIT_KEYS}
    conversion = defaults("conversion")
    print(f"repeat {args.repeat}, medians per map; load average {os.getloadavg()[0]:.1f}")
    print(
        f"{'map':36s} {'nvmeta path':12s} {'cpu: nvmeta':>12s} {'recipe':>8s} {'ratio':>6s}"
        f" {'wall: nvmeta':>13s} {'recipe':>8s} {'ratio':>6s}"
    )
    tot = {"nv_cpu": 0.0, "re_cpu": 0.0, "nv_wall": 0.0, "re_wall": 0.0}
    with tempfile.TemporaryDirectory() as tmp:
        for image_id, (label, n_default) in MAPS.items():
            rec = json.loads((SNAPSHOT / "api" / "images" / f"{abs(image_id)}.json").read_text())
            rec["number_of_subjects"] = rec.get("number_of_subjects") or n_default
            rec["nvmeta"] = {"status": "ok", "reason": None}
            d = Path(tmp) / str(image_id)
            d.mkdir()
            (d / "metadata.json").write_text(json.dumps(rec))
            src = manifest[abs(image_id)]
            if image_id == -990001:  # the same data, grid shifted off the template lattice
                import nibabel as nib

                img = nib.load(src)
                aff = img.affine.copy()
                aff[:3, 3] += 0.7
                src = d / "shifted.nii.gz"
                nib.save(nib.Nifti1Image(np.asarray(img.dataobj), aff, img.header), src)
            elif image_id == -990002:  # a 1.5 mm map (10 % of the synthetic 400-map benchmark's grids)
                import nibabel as nib
                from nilearn.image import resample_img

                img = nib.load(src)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    fine = resample_img(
                        img, target_affine=np.diag([1.5, 1.5, 1.5]), interpolation="nearest", copy_header=True
                    )
                src = d / "fine.nii.gz"
                nib.save(nib.Nifti1Image(np.asarray(fine.dataobj, dtype=np.float32), fine.affine), src)

            def nv(d=d, src=src):
                return make_zmap(
                    d / "metadata.json",
                    src,
                    mask,
                    {**defaults("conversion"), **conversion},
                    d / "zmap.nii.gz",
                    d / "qc.json",
                    limits,
                )

            qc = nv()  # warm-up (imports, OS cache)
            assert qc["status"] == "included", qc
            df = qc["df"]
            recipe(src, df, mask)
            nv_w, nv_c, re_w, re_c = [], [], [], []
            for _ in range(args.repeat):
                w, c = _timed(nv)
                nv_w.append(w)
                nv_c.append(c)
                w, c = _timed(lambda src=src, df=df: recipe(src, df, mask))
                re_w.append(w)
                re_c.append(c)
            m = {
                k: statistics.median(v)
                for k, v in zip(("nw", "nc", "rw", "rc"), (nv_w, nv_c, re_w, re_c), strict=True)
            }
            tot["nv_cpu"] += m["nc"]
            tot["re_cpu"] += m["rc"]
            tot["nv_wall"] += m["nw"]
            tot["re_wall"] += m["rw"]
            print(
                f"{label:36s} {qc['resample_method']:12s} {m['nc']:11.3f}s {m['rc']:7.3f}s {m['nc'] / m['rc']:5.2f}x"
                f" {m['nw']:12.3f}s {m['rw']:7.3f}s {m['nw'] / m['rw']:5.2f}x"
            )
    print(
        f"{'all maps (sum of medians)':36s} {'':12s} {tot['nv_cpu']:11.3f}s {tot['re_cpu']:7.3f}s "
        f"{tot['nv_cpu'] / tot['re_cpu']:5.2f}x {tot['nv_wall']:12.3f}s {tot['re_wall']:7.3f}s "
        f"{tot['nv_wall'] / tot['re_wall']:5.2f}x"
    )


if __name__ == "__main__":
    main()
