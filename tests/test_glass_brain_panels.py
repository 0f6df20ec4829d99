"""The glass-brain grid (nvmeta.figures.glass) against nilearn's ``plot_glass_brain`` drawn alone.

Reference: for each map, a figure of the grid's size holding only that map's panel, drawn by nilearn's
``plot_glass_brain`` into an Axes at the panel's place with the shared colour limits; the grid's
pixels inside that panel must equal it exactly (RGBA), so that no panel is changed by the others. The
shared limit is checked against numpy's percentile over every map's drawn voxels.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.image as mpimg  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.style  # noqa: E402
import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from nvmeta.figures import glass  # noqa: E402
from nvmeta.figures.maps import ROBUST_PERCENTILE  # noqa: E402
from nvmeta.testing import demo_pain_maps  # noqa: E402

# nilearn on the all-below-threshold map (no supra-threshold voxel to bound)
pytestmark = pytest.mark.filterwarnings("ignore:empty mask:UserWarning")

THRESHOLD = 3.0


@pytest.fixture(autouse=True)
def _rc_as_after_importing_nimare():
    """Every test here runs with the rcParams NiMARE's import leaves behind (``savefig.bbox: tight``),
    as in a process that imported it: the grid must keep its designed size anyway."""
    with matplotlib.rc_context({"savefig.bbox": "tight", "savefig.dpi": 72.0, "font.size": 17}):
        yield


@pytest.fixture(scope="module")
def zmap_paths(tmp_path_factory) -> list:
    """Maps on the demo's 2 mm grid (LAS, as stored), one with a few extreme voxels."""
    root = tmp_path_factory.mktemp("glass_maps")
    src = nib.load(demo_pain_maps()[0][0])
    t = np.asarray(src.dataobj, dtype=np.float32)
    aff = src.affine
    extreme = t.copy()
    extreme[40:42, 50:52, 40:42] = 400.0  # 8 voxels that must not set the scale
    half = t.copy()
    half[: t.shape[0] // 2] = np.nan  # one hemisphere without data
    half[t == 0] = np.nan
    maps = {
        "pain_01: T statistic — pain vs rest": t,
        "pain_02: T statistic — pain vs rest": extreme,
        "pain_03: T statistic — pain vs rest": t * (2.5 / np.nanmax(np.abs(t))),  # nothing above 3
        "pain_04: T statistic — pain vs rest": half,
        "pain_05: T statistic — pain vs rest": -np.abs(0.7 * t),
    }
    out = []
    for i, (name, data) in enumerate(maps.items()):
        path = root / f"{i}.nii.gz"
        nib.save(nib.Nifti1Image(data.astype(np.float32), aff), path)
        out.append((900 + i, name, path))
    return out


def _shared_vmax(paths) -> float:
    drawn = []
    for p in paths:
        d = np.asarray(nib.load(p).dataobj, dtype=np.float64)
        a = np.abs(d[np.isfinite(d)])
        drawn.append(a[a > THRESHOLD])
    return float(np.percentile(np.concatenate(drawn), ROBUST_PERCENTILE))


def test_every_panel_equals_plot_glass_brain_alone(zmap_paths, tmp_path):
    from nilearn.plotting import plot_glass_brain

    out = glass.glass_brain_grid(zmap_paths, tmp_path / "grid.png", suptitle="test grid")
    got = (mpimg.imread(out) * 255).round().astype(np.uint8)
    ncols, nrows, mode = glass.grid_shape(len(zmap_paths))
    assert (ncols, nrows, mode) == (3, 2, "ortho")
    panel_w, panel_h, pad, column = 4.6, 1.8, 0.42, 1.1
    head = 0.95
    fig_w, fig_h = ncols * panel_w + column, nrows * (panel_h + pad) + head
    assert got.shape == (round(fig_h * 100), round(fig_w * 100), 4)  # not cropped by savefig.bbox
    vmax = _shared_vmax([p for _, _, p in zmap_paths])
    assert vmax < 20  # the 8 voxels at 400 do not set the scale
    for k, (_, _, path) in enumerate(zmap_paths):
        row, col = divmod(k, ncols)
        bottom = fig_h - head - (row + 1) * (panel_h + pad)
        box = (col * panel_w / fig_w, bottom / fig_h, panel_w / fig_w, panel_h / fig_h)
        with matplotlib.style.context("default"):
            fig = plt.figure(figsize=(fig_w, fig_h), dpi=100, facecolor="white")
            ax = fig.add_axes(box)
            img = nib.load(path)
            data = np.asarray(img.dataobj, dtype=np.float32)
            plot_glass_brain(
                nib.Nifti1Image(np.where(np.isfinite(data), data, 0).astype(np.float32), img.affine),
                figure=fig, axes=ax, display_mode=mode, threshold=THRESHOLD, plot_abs=False, colorbar=False,
                cmap="RdBu_r", vmin=-vmax, vmax=vmax, annotate=False, black_bg=False, symmetric_cbar=False,
            )  # fmt: skip
            fig.canvas.draw()
            ref = np.asarray(fig.canvas.buffer_rgba()).copy()
            plt.close(fig)
        h = ref.shape[0]
        r0, r1 = h - round((bottom + panel_h) * 100), h - round(bottom * 100)
        c0, c1 = round(col * panel_w * 100), round((col + 1) * panel_w * 100)
        np.testing.assert_array_equal(got[r0:r1, c0:c1], ref[r0:r1, c0:c1], err_msg=f"panel {k}")
    # the map with nothing above the threshold has no colour at all in its panel
    row, col = divmod(2, ncols)
    bottom = fig_h - head - (row + 1) * (panel_h + pad)
    h = got.shape[0]
    rgb = got[h - round((bottom + panel_h) * 100) : h - round(bottom * 100),
              round(col * panel_w * 100) : round((col + 1) * panel_w * 100), :3].astype(int)  # fmt: skip
    assert ((np.abs(rgb[..., 0] - rgb[..., 1]) < 8) & (np.abs(rgb[..., 1] - rgb[..., 2]) < 8)).all()


def test_titles_say_once_what_every_map_shares():
    rest, pre, suf = glass.split_common(
        [
            "pain_01: T statistic — pain vs rest",
            "pain_02: T statistic — pain vs rest",
            "pain_10: T statistic — pain vs rest",
        ]
    )
    assert rest == ["pain_01", "pain_02", "pain_10"] and pre == "" and suf == "T statistic — pain vs rest"
    rest, pre, suf = glass.split_common(["finger tapping task: left hand", "finger tapping task: right hand"])
    assert rest == ["left hand", "right hand"] and pre == "finger tapping task:" and suf == ""
    # shorter than MIN_COMMON_CHARS: left in the titles
    assert glass.split_common(["motor: left", "motor: right"]) == (["motor: left", "motor: right"], "", "")
    assert glass.split_common(["a b", "c d"]) == (["a b", "c d"], "", "")  # nothing shared
    assert glass.split_common(["same words here", "same words here"]) == (["", ""], "", "same words here")
    assert glass.split_common(["only one title"]) == (["only one title"], "", "")
    # two lines at most, the second shortened
    label = glass._label(990001, "a very long distinctive title " * 6, 46)
    assert label.count("\n") == 1 and label.startswith("990001: a very long") and label.endswith("…")


def test_layout_sizes():
    assert glass.grid_shape(1) == (1, 1, "ortho")
    assert glass.grid_shape(21)[:2] == (4, 6)
    ncols, nrows, mode = glass.grid_shape(100)
    assert mode == "z" and ncols * nrows >= 100 and ncols <= 10
