"""The CBMA figures: a CBMA method's z map, and the IBMA map with each CBMA method's clusters.

Both show a one-sided (positive) z, so both use a sequential colour map (:data:`POSITIVE_CMAP`): a
diverging one would show low positive z in the colour of deactivation. Drawn with
:func:`nvmeta.figures.maps.mosaic_row` (title above the slices, labelled colour bar, legend, robust
colour limit, pinned rcParams).
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

__all__ = ["CBMA_CUTS", "POSITIVE_CMAP", "Z_UNCORRECTED", "plot_cbma", "plot_overlap"]

#: Axial cuts (mm) of the CBMA figures.
CBMA_CUTS = [-20, -8, 4, 16, 28, 40, 52, 64]
#: Colour map of the positive-only z of the CBMA and IBMA-vs-CBMA figures (sequential: a diverging
#: map would show low positive z in the colour of deactivation).
POSITIVE_CMAP = "YlOrRd"
#: Uncorrected display threshold of the CBMA z (one-sided p < 0.025).
Z_UNCORRECTED = 1.96


def plot_cbma(z_img: nib.Nifti1Image, z_sig_img: nib.Nifti1Image, out_png: Path, label: str, n_exps: int,
          alpha: float, cfg: dict, n_clusters: int) -> None:  # fmt: skip
    """Mosaic of a CBMA z map: full colour where a cluster survives cluster-level FWE, faded elsewhere above 1.96.

    The title says what the colours are; the legend counts the significant clusters and voxels.
    """
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    from nvmeta.figures import maps

    z = np.nan_to_num(np.asarray(z_img.dataobj, dtype=np.float32), nan=0.0)
    sig = np.asarray(z_sig_img.dataobj) > 0
    faded = np.where(~sig & (z > Z_UNCORRECTED), z, 0.0).astype(np.float32)
    shown = np.where(sig, z, 0.0).astype(np.float32)
    scale = maps.robust_scale(np.where(z > Z_UNCORRECTED, z, 0.0), Z_UNCORRECTED)
    vmax = scale.vmax
    cmap = plt.get_cmap(POSITIVE_CMAP)
    n_sig = int(sig.sum())
    legend = [
        (Patch(facecolor=cmap(0.75), edgecolor="none"),
         f"cluster-level FWE p < {alpha:g}: {n_clusters} cluster{'s' * (n_clusters != 1)}, {n_sig:,} voxels"),
        (Patch(facecolor=cmap(0.75), alpha=0.35, edgecolor="none"), f"z > {Z_UNCORRECTED:g} uncorrected only"),
    ]  # fmt: skip
    title = f"{label} of the peaks of {n_exps} experiments: z, in full colour where a cluster survives cluster-level FWE p < {alpha:g}"
    subtitle = (
        f"cluster-forming p < {float(cfg['voxel_thresh']):g}, {int(cfg['n_iters']):,} Monte-Carlo iterations; "
        + scale.note("z")
    )
    with maps.pinned():
        fig = plt.figure(figsize=(14, 3.7))
        maps.mosaic_row(
            fig, (0.0, 0.0, 1.0, 1.0), nib.Nifti1Image(shown, z_img.affine), cut_coords=CBMA_CUTS, title=title,
            subtitle=subtitle, cmap=cmap, vmin=0.0, vmax=vmax, threshold=Z_UNCORRECTED if not n_sig else 1e-6,
            cbar_label="z (one-sided)", cbar_marks=(Z_UNCORRECTED,), legend=legend,
            overlays=[{"img": nib.Nifti1Image(faded, z_img.affine), "threshold": Z_UNCORRECTED, "cmap": cmap,
                       "vmin": 0.0, "vmax": vmax, "transparency": 0.35}],
            empty_note=None if faded.any() else f"no voxel with z > {Z_UNCORRECTED:g}",
        )  # fmt: skip
        maps.save(fig, out_png)


def plot_overlap(ibma_dir, ibma_name, cbma_dirs, table, mask_img, alpha, sgn, out_png: Path) -> None:
    """The IBMA FDR z map (sequential colours, one sign) with each CBMA method's cluster-FWE clusters outlined."""
    import matplotlib.pyplot as plt

    from nvmeta.cbma.estimate import LEVEL_MAPS, significant_mask
    from nvmeta.figures import maps

    z = np.nan_to_num(
        np.asarray(nib.load(Path(ibma_dir) / "z_fdr.nii.gz").dataobj, dtype=np.float32), nan=0.0
    )
    shown = np.where(z * sgn > 0, np.abs(z), 0.0).astype(np.float32)
    styles = [("#0072B2", "solid"), ("black", "dashed"), ("#CC79A7", "dotted")]  # tell apart in grey too
    outlines = []
    for i, (name, d) in enumerate(cbma_dirs.items()):
        sel = table[
            (table.ibma_method == ibma_name) & (table.cbma_method == name) & (table.cbma_level == "cluster")
        ]
        dice = float(sel["dice"].iloc[0]) if len(sel) else float("nan")
        logp = np.asarray(nib.load(Path(d) / f"{LEVEL_MAPS['cluster']}.nii.gz").dataobj)
        sig = significant_mask(logp, alpha).astype(np.int8)
        colour, style = styles[i % len(styles)]
        label = (
            f"{name.upper()} clusters (Dice {dice:.2f})"
            if sig.any()
            else f"{name.upper()}: no significant cluster"
        )
        outlines.append(maps.Outline(nib.Nifti1Image(sig, mask_img.affine), colour, label, style))
    sign = "positive" if sgn > 0 else "negative"
    scale = maps.robust_scale(shown, 0.0)
    with maps.pinned():
        fig = plt.figure(figsize=(14, 3.8))
        maps.mosaic_row(
            fig, (0.0, 0.0, 1.0, 1.0), nib.Nifti1Image(shown, mask_img.affine), cut_coords=CBMA_CUTS,
            title=f"IBMA {ibma_name} (colour: FDR-significant {sign} z) vs CBMA clusters at cluster-level FWE p < {alpha:g} (outlines)",
            subtitle=scale.note("|z|"), cmap=POSITIVE_CMAP, vmin=0.0, vmax=scale.vmax, threshold=1e-6,
            cbar_label=f"{ibma_name} |z| (FDR)" if sgn < 0 else f"{ibma_name} z (FDR)", outlines=outlines,
            empty_note=f"no FDR-significant {sign} IBMA voxel",
        )  # fmt: skip
        maps.save(fig, out_png)
