"""The brain mosaics of every figure (nvmeta.figures.maps and the meta, effect-size and CBMA figures),
the method texts and their references, and the silencing of known dependency warnings.

References: numpy's percentile for the robust colour limit, matplotlib's own colour maps for the
pixels a figure must (or must not) contain, PNG headers for the pinned figure sizes, NiMARE's and
nvmeta's registries for the method texts.
"""

from __future__ import annotations

import logging
import struct
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.image as mpimg  # noqa: E402
import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from nvmeta.figures import maps  # noqa: E402

AFFINE = np.array([[-2.0, 0, 0, 90], [0, 2.0, 0, -126], [0, 0, 2.0, -72], [0, 0, 0, 1]])
SHAPE = (91, 109, 91)  # the MNI 2 mm grid, so that nilearn's template is the background
CFG = {"threshold": 3.0, "cut_coords": [-20, -4, 6, 20, 40, 56], "vmax": None}


@pytest.fixture(autouse=True)
def _rc_as_after_importing_nimare():
    """As in a process that imported NiMARE (``savefig.bbox: tight``): figures keep their size."""
    with matplotlib.rc_context({"savefig.bbox": "tight", "savefig.dpi": 72.0}):
        yield


def _png_size(path: Path) -> tuple[int, int]:
    head = Path(path).read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


def _brain_block(value: float, outliers: float | None = None) -> np.ndarray:
    data = np.zeros(SHAPE, np.float32)
    data[25:65, 30:80, 20:70] = value  # through every cut
    if outliers is not None:
        data[45:47, 55:57, 45:47] = outliers  # 8 voxels
    return data


def test_robust_scale_is_the_percentile_of_the_shown_voxels():
    rng = np.random.default_rng(0)
    v = rng.normal(scale=4, size=100_000)
    v[:5] = 400.0
    v[5:50] = np.nan
    s = maps.robust_scale(v, 3.0)
    a = np.abs(v[np.isfinite(v)])
    shown = a[a > 3.0]
    assert s.vmax == pytest.approx(np.percentile(shown, maps.ROBUST_PERCENTILE))
    assert s.n_shown == shown.size and s.n_clipped == int((shown > s.vmax).sum()) and s.max_abs == 400.0
    assert "99th percentile of |z| over the" in s.note() and "up to 400, in the end colour" in s.note()
    fixed = maps.robust_scale(v, 3.0, fixed=10.0)
    assert fixed.vmax == 10.0 and fixed.source == "fixed" and fixed.n_clipped == int((shown > 10).sum())
    none = maps.robust_scale(np.zeros(10), 3.0)
    assert none.source == "none" and none.vmax > 3.0 and none.note() == ""


@pytest.mark.parametrize(("lo", "hi", "marks"), [(-380, 380, (3, -3)), (-17, 17, (3, -3)), (0, 5.3, (1.96,))])
def test_colour_bar_ticks_never_overprint(lo, hi, marks):
    ticks = maps.nice_ticks(lo, hi, marks)
    assert ticks[0] == lo and ticks[-1] == hi
    gaps = np.diff(ticks)
    assert (gaps > 0.11 * (hi - lo) - 1e-9).all(), ticks
    if hi - lo < 40:
        assert set(marks) <= set(ticks)


def _red_pixels(png) -> int:
    rgb = (mpimg.imread(png)[..., :3] * 255).astype(int)
    return int(((rgb[..., 0] - rgb[..., 2]) > 50).sum())  # RdBu_r from light pink to its dark red end


def test_z_mosaic_is_not_washed_out_by_a_few_extreme_voxels(tmp_path):
    """z = 10 everywhere shown but 8 voxels at 400: with the limit at max |z| (the old figure) z = 10
    is nearly white; with the robust limit it is the end colour."""
    from nvmeta.meta import outputs

    img = nib.Nifti1Image(_brain_block(10.0, outliers=400.0), AFFINE)
    outputs.plot_z(img, tmp_path / "z.png", CFG, "test")
    assert _png_size(tmp_path / "z.png") == (1400, 340)  # not cropped by savefig.bbox: tight
    outputs.plot_z(img, tmp_path / "z_max.png", {**CFG, "vmax": 400.0}, "test")
    assert _red_pixels(tmp_path / "z.png") > 20_000 > 10 * _red_pixels(tmp_path / "z_max.png")


def test_i2_of_zero_is_coloured_not_blank(tmp_path):
    from nvmeta.meta import outputs

    i2 = np.full(SHAPE, np.nan, np.float32)
    i2[25:65, 30:80, 20:70] = 0.9
    i2[25:45, 30:80, 20:70] = 0.0  # half the block: I² = 0
    g = nib.Nifti1Image(_brain_block(0.5), AFFINE)
    outputs.plot_effect(g, nib.Nifti1Image(i2, AFFINE), tmp_path / "est.png", CFG, "test")
    assert _png_size(tmp_path / "est.png") == (1400, 680)
    rgb = (mpimg.imread(tmp_path / "est.png")[340:, :1250, :3] * 255).astype(int)
    zero = np.array(matplotlib.colormaps["viridis"](0.0)[:3]) * 255
    high = np.array(matplotlib.colormaps["viridis"](0.9)[:3]) * 255
    n_zero = int((np.abs(rgb - zero).max(axis=-1) < 6).sum())
    n_high = int((np.abs(rgb - high).max(axis=-1) < 6).sum())
    assert n_zero > 0.3 * n_high > 1000, (n_zero, n_high)


def test_ibma_vs_cbma_uses_one_sign_colours_and_a_legend(tmp_path):
    """Positive-only z in a diverging map showed low z in blue; the sequential map has no blue."""
    from nvmeta.cbma import estimate
    from nvmeta.figures import cbma_maps

    z = _brain_block(0.0)
    z[25:65, 30:80, 20:70] = np.linspace(2.0, 7.0, 40)[:, None, None]
    ibma = tmp_path / "meta" / "stouffer"
    ibma.mkdir(parents=True)
    nib.save(nib.Nifti1Image(z, AFFINE), ibma / "z_fdr.nii.gz")
    cdirs = {}
    for m, box in (("ale", np.s_[40:50, 50:60, 40:52]), ("mkda", np.s_[28:36, 36:46, 40:52])):
        d = tmp_path / "cbma" / m
        d.mkdir(parents=True)
        logp = np.zeros(SHAPE, np.float32)
        logp[box] = 3.0  # p = 0.001: significant
        nib.save(nib.Nifti1Image(logp, AFFINE), d / f"{estimate.LEVEL_MAPS['cluster']}.nii.gz")
        cdirs[m] = d
    table = pd.DataFrame({"ibma_method": "stouffer", "cbma_method": ["ale", "mkda"], "cbma_level": "cluster",
                          "dice": [0.06, 0.09]})  # fmt: skip
    mask = nib.Nifti1Image((z > 0).astype(np.uint8), AFFINE)
    cbma_maps.plot_overlap(ibma, "stouffer", cdirs, table, mask, 0.05, 1.0, tmp_path / "o.png")
    assert _png_size(tmp_path / "o.png") == (1400, 380)
    rgb = (mpimg.imread(tmp_path / "o.png")[110:, :1250, :3] * 255).astype(int)
    outline = np.array([0, 114, 178])  # the first CBMA method's outline colour (Okabe-Ito blue)
    light_blue = (rgb[..., 2] - rgb[..., 0] > 40) & (np.abs(rgb - outline).max(axis=-1) > 60)
    assert int(light_blue.sum()) < 50  # antialiased outline edges only
    assert int((np.abs(rgb - outline).max(axis=-1) < 30).sum()) > 50  # the outline is drawn


def test_cbma_figure_colours_the_significant_clusters(tmp_path):
    from nvmeta.figures import cbma_maps

    z = _brain_block(2.5)
    z[40:50, 50:60, 40:50] = 6.0
    sig = np.where(z > 5, z, 0).astype(np.float32)
    cfg = {"voxel_thresh": 0.001, "n_iters": 100}
    cbma_maps.plot_cbma(
        nib.Nifti1Image(z, AFFINE), nib.Nifti1Image(sig, AFFINE), tmp_path / "z.png", "ALE", 21, 0.05, cfg, 1
    )
    assert _png_size(tmp_path / "z.png") == (1400, 370)
    rgb = (mpimg.imread(tmp_path / "z.png")[110:, :1250, :3] * 255).astype(int)
    end = np.array(matplotlib.colormaps[cbma_maps.POSITIVE_CMAP](1.0)[:3]) * 255
    assert int((np.abs(rgb - end).max(axis=-1) < 12).sum()) > 200  # the cluster in full colour


def test_not_computed_is_said_on_the_z_figure(tmp_path, monkeypatch):
    """One usable map: "not computed: 1 usable map", not "no voxel survives FDR"."""
    from nvmeta.meta import outputs, run_method

    mask = np.zeros((10, 12, 8), np.uint8)
    mask[1:-1, 1:-1, 1:-1] = 1
    mask_img = nib.Nifti1Image(mask, AFFINE)
    data = np.where(mask > 0, 4.0, np.nan).astype(np.float32)
    (tmp_path / "1").mkdir()
    nib.save(nib.Nifti1Image(data, AFFINE), tmp_path / "1" / "zmap.nii.gz")
    (tmp_path / "1" / "qc.json").write_text('{"image_id": 1, "n": 20}')
    pd.DataFrame([{"image_id": 1, "collection_id": 1, "status": "included"}]).to_csv(
        tmp_path / "qc.tsv", sep="\t", index=False
    )
    seen = {}
    monkeypatch.setattr(
        outputs,
        "plot_z",
        lambda img, png, cfg, title, empty_note=None: seen.update(title=title, note=empty_note),
    )
    run_method(
        "stouffer",
        tmp_path / "qc.tsv",
        lambda i: tmp_path / str(i) / "zmap.nii.gz",
        mask_img,
        None,
        tmp_path / "out",
    )
    assert seen == {"title": "Stouffer, 1 map: z where FDR q < 0.05, |z| > 3 shown",
                    "note": "not computed: 1 usable map (at least 2 needed)"}  # fmt: skip


def test_method_texts_cover_both_registries_and_every_reference_resolves():
    from nvmeta.cbma import estimate
    from nvmeta.figures import citations
    from nvmeta.meta.registry import ESTIMATORS

    assert set(citations.IBMA_METHODS) == set(ESTIMATORS)
    assert set(citations.CBMA_METHODS) == set(estimate.ESTIMATORS)
    keys = {k for t in [*citations.IBMA_METHODS.values(), *citations.CBMA_METHODS.values()] for k in t.cites}
    keys |= set(citations.REFS.values()) | {"hedges1985statistical", "eickhoff2012activation"}
    bib, missing = citations.bibtex(citations.cite(*sorted(keys)))
    assert missing == []
    import re

    assert sorted(re.findall(r"^@\w+\{([^,]+),", bib, flags=re.M)) == sorted(keys)
    assert citations.short_cite(r"a \citep{stouffer1949american,zaykin2011optimally}.") == (
        "a (Stouffer et al., 1949; Zaykin, 2011)."
    )


def test_known_warnings_are_silenced_counted_and_explained_once(caplog):
    from nvmeta.workflow.quiet import Known, quiet

    dep = Known("Passing a Dataset", "why A", category=FutureWarning)
    note = Known("New masker does not match", "why B", logger_name="nimare.dataset")
    other = []
    with caplog.at_level(logging.INFO), warnings.catch_warnings(record=True) as outer:
        warnings.simplefilter("always")
        with quiet(dep, note):
            for _ in range(3):
                warnings.warn(
                    "Passing a Dataset to a NiMARE algorithm is deprecated", FutureWarning, stacklevel=1
                )
            warnings.warn("something else", UserWarning, stacklevel=1)
            logging.getLogger("nimare.dataset").warning("New masker does not match old masker.")
            logging.getLogger("nimare.dataset").warning("another record")
        other = [str(w.message) for w in outer]
    assert other == ["something else"]  # shown as it would have been
    records = [r.getMessage() for r in caplog.records]
    assert "another record" in records and not any(m.startswith("New masker") for m in records)
    assert "silenced 3 known message(s) 'Passing a Dataset': why A" in records
    assert "silenced 1 known message(s) 'New masker does not match': why B" in records
    assert not logging.getLogger("nimare.dataset").filters  # removed after the block
