"""One ICA component as a figure: nilearn's ``plot_stat_map`` (ortho), thresholded, with its colour bar.

Drawn from the ICA job's outputs only: the component's volume from ``components.nii.gz`` and the title
and threshold that ``summary.json`` records (:func:`nvmeta.ica.run.run_ica`), so that a figure job needs
neither the maps nor the labelling again.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import numpy as np

from nvmeta.ica.run import FIGURE_PERCENTILE

__all__ = ["component_figure", "plot_component"]

logger = logging.getLogger(__name__)


def plot_component(volume: np.ndarray, affine: np.ndarray, threshold: float, title: str, dest: Path) -> None:
    """Draw one component volume (NaN = not used) shown where ``|value| > threshold``, into ``dest``."""
    import matplotlib.pyplot as plt
    import nibabel as nib
    from nilearn import plotting

    from nvmeta.figures import maps

    data = np.nan_to_num(volume, nan=0.0).astype(np.float32)
    vmax = max(float(np.max(np.abs(data))), threshold * 1.05 + 1e-6)
    img = nib.Nifti1Image(data, affine)
    with maps.pinned(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fig = plt.figure(figsize=(10, 3.6))
        ax = fig.add_axes([0.0, 0.04, 0.88, 0.86])  # room below for the cut labels
        plotting.plot_stat_map(
            img, threshold=threshold, colorbar=False, title=None, figure=fig, axes=ax, vmin=-vmax, vmax=vmax,
            symmetric_cbar=False, cmap="RdBu_r",
        )  # fmt: skip
        maps.colorbar(fig, [0.9, 0.1, 0.016, 0.72], "RdBu_r", -vmax, vmax, "component value (unit variance)",
                      hidden=(-threshold, threshold), marks=(threshold, -threshold), fmt="{:.2g}")  # fmt: skip
        fig.suptitle(title, fontsize=10, y=0.995, va="top")
        maps.save(fig, dest)


def component_figure(
    components_nii: str | os.PathLike, summary_json: str | os.PathLike, k: int, dest: str | os.PathLike
) -> Path:
    """``component_{k}.png`` of an ICA: component ``k`` with its title, threshold and convergence note.

    Parameters
    ----------
    components_nii : path-like
        The ICA's ``components.nii.gz`` (X, Y, Z, n_components).
    summary_json : path-like
        The ICA's ``summary.json`` (``titles``, ``figure_thresholds``, ``converged``).
    k : int
        Component index.
    dest : path-like
        The PNG (written atomically; a killed earlier attempt's temporaries are removed first).

    Raises
    ------
    ValueError
        ``k`` is not a component of this ICA.
    """
    import nibabel as nib

    from nvmeta.images.download import remove_stale_temps
    from nvmeta.io import read_json

    dest = Path(dest)
    remove_stale_temps(dest)
    summary = read_json(summary_json)
    n = int(summary["n_components"])
    if not 0 <= int(k) < n:
        raise ValueError(
            f"{summary_json}: the ICA has {n} components (0 to {n - 1}); there is no component {k}"
        )
    k = int(k)
    img = nib.load(os.fspath(components_nii))
    volume = np.asarray(img.dataobj[..., k])
    threshold = float(summary["figure_thresholds"][k])
    text = (
        f"{summary['titles'][k]}  |  component values (unit variance), shown where |value| > {threshold:.2f} "
        f"(top {100 - FIGURE_PERCENTILE:g} % of voxels)"
    )
    if not all(summary["converged"]):
        text += "\nNOT CONVERGED: FastICA stopped at ica.max_iter (ica.allow_unconverged is true)"
    plot_component(volume, img.affine, threshold, text, dest)
    logger.info(
        "ICA component %d: %s, shown where |value| > %.2f: %s", k, summary["titles"][k], threshold, dest
    )
    return dest
