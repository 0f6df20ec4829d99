"""The glass-brain grid's panels, drawn on one reused nilearn display, against ``plot_glass_brain``.

Reference: nilearn's ``plot_glass_brain`` called here with the arguments every grid panel has
(one new figure per map, as the grid used to draw them); each reused-display panel must equal
it pixel for pixel (RGBA), map after map, so that nothing one map adds (colour bar, view
limits) is left for the next.
"""

from __future__ import annotations

import logging

import matplotlib

matplotlib.use("Agg")

import matplotlib.image as mpimg  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from nvmeta.figures import plotting as plotting  # noqa: E402
from nvmeta.meta import frozen_gc  # noqa: E402
from nvmeta.testing import demo_pain_maps  # noqa: E402

# nilearn on the all-below-threshold map (no supra-threshold voxel to bound)
pytestmark = pytest.mark.filterwarnings("ignore:empty mask:UserWarning")

THRESHOLD = 3.0


@pytest.fixture(autouse=True)
def _rc_as_after_importing_nimare():
    """Every test here runs with the rcParams NiMARE's import leaves behind (``savefig.bbox:
    tight``), as in a process that imported it: the grid must keep its designed size anyway
    (the full suite failed on that, after tests/test_cbma.py had imported NiMARE)."""
    with matplotlib.rc_context({"savefig.bbox": "tight", "savefig.dpi": 100.0}):
        yield


PANEL = {"ortho": (5.2, 2.0), "z": (2.0, 2.4)}  # glass_brain_grid's panel sizes (inches)
DPI = 100


def _reference(img, vmax: float, mode: str) -> np.ndarray:
    """RGBA of ``plot_glass_brain`` in a figure of its own (the per-map drawing)."""
    from nilearn.plotting import plot_glass_brain

    w, h = PANEL[mode]
    fig = plt.figure(figsize=(w, h), dpi=DPI, facecolor="white")
    try:
        plot_glass_brain(
            img,
            display_mode=mode,
            figure=fig,
            threshold=THRESHOLD,
            plot_abs=False,
            colorbar=mode == "ortho",
            cmap="cold_hot",
            vmin=-vmax,
            vmax=vmax,
            annotate=False,
            black_bg=False,
        )
        fig.canvas.draw()
        return np.asarray(fig.canvas.buffer_rgba()).copy()
    finally:
        plt.close(fig)


@pytest.fixture(scope="module")
def zmap_paths(tmp_path_factory) -> list:
    """Maps on the demo's 2 mm grid (LAS, as stored): colour limits from 3.001 to ~26."""
    root = tmp_path_factory.mktemp("glass_maps")
    src = nib.load(demo_pain_maps()[0][0])
    t = np.asarray(src.dataobj, dtype=np.float32)
    aff = src.affine
    corner = np.zeros_like(t)
    corner[:3, :3, :3] = 8.0  # supra-threshold at a corner of the box, outside the schematic
    corner[40:45, 50:55, 40:45] = -5.0
    half = t.copy()
    half[: t.shape[0] // 2] = np.nan  # one hemisphere without data
    half[t == 0] = np.nan
    maps = {
        "corner": corner,  # first: the bounds it adds must not stay for the next maps
        "pain": t,
        "pain x 2.5": 2.5 * t,
        "below threshold": t * (2.5 / np.nanmax(np.abs(t))),
        "nan": half,
        "negative": -np.abs(0.7 * t),
    }
    out = []
    for i, (name, data) in enumerate(maps.items()):
        path = root / f"{i}.nii.gz"
        nib.save(nib.Nifti1Image(data.astype(np.float32), aff), path)
        out.append((900 + i, name, path))
    return out


@pytest.mark.parametrize("mode", ["ortho", "z"])
def test_reused_display_panels_equal_plot_glass_brain(zmap_paths, mode):
    w, h = PANEL[mode]
    with frozen_gc():
        inputs = [plotting._panel_input(item, THRESHOLD, 52) for item in zmap_paths]
        vmaxes = [vmax for _, _, vmax in inputs]
        assert len(set(np.round(vmaxes, 3))) == len(vmaxes)  # a different colour scale each
        assert vmaxes[3] == pytest.approx(THRESHOLD + 1e-3)  # the all-below-threshold map
        assert np.isnan(np.asarray(nib.load(zmap_paths[4][2]).dataobj)).any()
        reused = plotting._ReusedGlassBrain(*inputs[0][1:], mode, w, h, DPI, THRESHOLD)
        try:
            first = reused.first
            reused.make_reusable()
            # the schematic is drawn by one PathCollection per view instead of ~260 patches
            assert all(
                len(d.ax.patches) == 0 and len(d.ax.collections) == 1 for d in reused.display.axes.values()
            )
            panels = [reused.render(img, vmax) for _, img, vmax in inputs]
            # again in another order: the corner map's bounds last, the others unaffected
            again = [reused.render(img, vmax) for _, img, vmax in inputs[::-1]][::-1]
        finally:
            reused.close()
        refs = [_reference(img, vmax, mode) for _, img, vmax in inputs]
    assert panels[0].shape == (h * DPI, w * DPI, 4)
    assert np.array_equal(first, refs[0])
    for (_, name, _), panel, second, ref in zip(zmap_paths, panels, again, refs, strict=True):
        assert np.array_equal(panel, ref), name
        assert np.array_equal(second, ref), name
    # the maps do look different (colours, colour bars); the one below threshold has no
    # colour at all (its colour bar, |z| <= 3.001, is all below the threshold too)
    for i in range(len(refs)):
        for j in range(i):
            assert not np.array_equal(refs[i], refs[j])
    rgb = refs[3][..., :3].astype(int)
    no_colour = (np.abs(rgb[..., 0] - rgb[..., 1]) < 8) & (np.abs(rgb[..., 1] - rgb[..., 2]) < 8)
    assert no_colour.all()
    rgb = refs[1][..., :3].astype(int)
    assert ((rgb[..., 0] - rgb[..., 2]) > 100).sum() > 100  # red/yellow blobs


def test_reused_display_is_reset_after_each_map(zmap_paths):
    """Made reusable from the corner map (bounds beyond the schematic), the display is as
    nilearn builds it without a map (``plot_glass_brain(None)``: the reference), and each
    map's overlay goes away entirely."""
    from nilearn.plotting import plot_glass_brain

    w, h = PANEL["ortho"]

    def layout(fig, display):
        views = {
            k: (d.get_object_bounds(), d.ax.get_xlim(), d.ax.get_ylim()) for k, d in display.axes.items()
        }
        return len(fig.axes), views

    with frozen_gc():
        ref_fig = plt.figure(figsize=(w, h), dpi=DPI)
        try:
            ref = layout(ref_fig, plot_glass_brain(None, figure=ref_fig, plot_abs=False, colorbar=True))
        finally:
            plt.close(ref_fig)
        _, img, vmax = plotting._panel_input(zmap_paths[0], THRESHOLD, 52)
        reused = plotting._ReusedGlassBrain(img, vmax, "ortho", w, h, DPI, THRESHOLD)
        try:
            assert layout(reused.fig, reused.display)[1] != ref[1]  # the corner map widened the views
            reused.make_reusable()
            assert layout(reused.fig, reused.display) == ref
            fig = reused.fig
            axes = list(fig.axes)
            before = [(list(ax.get_children()), ax.get_xlim(), ax.get_ylim()) for ax in axes]
            for item in zmap_paths[:2]:
                _, img, vmax = plotting._panel_input(item, THRESHOLD, 52)
                reused.render(img, vmax)
                assert list(fig.axes) == axes  # the colour bar's axes removed
                after = [(list(ax.get_children()), ax.get_xlim(), ax.get_ylim()) for ax in axes]
                assert after == before
                assert layout(fig, reused.display) == ref
        finally:
            reused.close()


def _grid(items, path) -> np.ndarray:
    plotting.glass_brain_grid(items, path, suptitle="test grid")
    return mpimg.imread(path)


def test_glass_brain_grid_equals_one_figure_per_map(zmap_paths, tmp_path, monkeypatch, caplog):
    items = zmap_paths[1:] + zmap_paths[:1]  # 6 maps: 3 columns x 2 rows, ortho
    fast = _grid(items, tmp_path / "fast.png")
    # 3 x 5.2 in wide; 2 x (2.0 + 0.35) + 0.5 in high; at 100 dpi
    assert fast.shape == (520, 1560, 4)
    with monkeypatch.context() as m:
        # the per-map figures
        m.setattr(plotting, "_first_panel", lambda img, vmax, args: (plotting._panel(img, vmax, *args), None))
        slow = _grid(items, tmp_path / "slow.png")
    assert np.array_equal(fast, slow)

    # a reused panel that differs from plot_glass_brain's: warned, one figure per map
    render = plotting._ReusedGlassBrain.render

    def off_by_one(self, img, vmax):
        out = render(self, img, vmax)
        out[0, 0, 0] ^= 1
        return out

    with monkeypatch.context() as m, caplog.at_level(logging.WARNING, logger="nvmeta.figures.plotting"):
        m.setattr(plotting._ReusedGlassBrain, "render", off_by_one)
        assert np.array_equal(_grid(items, tmp_path / "differs.png"), slow)
    assert "differs from plot_glass_brain" in caplog.text
    caplog.clear()

    # the reused display failing on the 4th map: that map and the next drawn one figure each
    calls = []

    def fails(self, img, vmax):
        calls.append(1)
        if len(calls) == 4:
            raise RuntimeError("boom")
        return render(self, img, vmax)

    with monkeypatch.context() as m, caplog.at_level(logging.WARNING, logger="nvmeta.figures.plotting"):
        m.setattr(plotting._ReusedGlassBrain, "render", fails)
        assert np.array_equal(_grid(items, tmp_path / "fails.png"), slow)
    assert "reused glass-brain display failed" in caplog.text and len(calls) == 4


def test_grid_layout_equals_plain_matplotlib(tmp_path, monkeypatch):
    """The grid around the panels (axes, titles, suptitle) equals the plain recipe: axes
    switched off (their axis objects left visible), imshow, set_title; synthetic panels."""
    rng = np.random.default_rng(3)
    labels = ["901: gjpq (descenders) " * 3, "902: (no contrast)", "903: ÄÖ x", "904: y", "905: _"]
    panels = [(lab, rng.integers(0, 256, size=(200, 520, 4), dtype=np.uint8)) for lab in labels]
    for _, rgba in panels:
        rgba[..., 3] = 255
    monkeypatch.setattr(plotting, "_glass_rasters", lambda *a: panels)
    items = [(901 + i, None, "unused") for i in range(5)]
    got = _grid(items, tmp_path / "grid.png")

    ncols, nrows, panel_w, panel_h, pad, head = 3, 2, 5.2, 2.0, 0.35, 0.5
    fig_w, fig_h = ncols * panel_w, nrows * (panel_h + pad) + head
    fig = plt.figure(figsize=(fig_w, fig_h), facecolor="white")
    for i, (label, rgba) in enumerate(panels):
        row, col = divmod(i, ncols)
        bottom = fig_h - head - (row + 1) * (panel_h + pad)
        ax = fig.add_axes((col / ncols, bottom / fig_h, 1 / ncols, panel_h / fig_h))
        ax.imshow(rgba, interpolation="nearest")
        ax.set_axis_off()
        ax.set_title(label, fontsize=9, pad=2)
    fig.suptitle("test grid", y=1 - 0.2 * head / fig_h, va="top", fontsize=12)
    with matplotlib.rc_context({"savefig.bbox": "standard"}):  # the figure as laid out
        fig.savefig(tmp_path / "ref.png", dpi=DPI, facecolor="white")
    plt.close(fig)
    ref = mpimg.imread(tmp_path / "ref.png")
    assert got.shape == ref.shape == (520, 1560, 4)
    assert np.array_equal(got, ref)
