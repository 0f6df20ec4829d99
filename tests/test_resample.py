"""Resampling onto the template grid: exact values on known grids, NaN/zero background stays NaN."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from nvmeta.images import resample as R
from nvmeta.images.resample import resample_to_template
from nvmeta.images.template import load_mask

# Template: 20^3 voxels of 2 mm, RAS, world x = 2 i - 20 (voxel centres at -20..18 mm).
T_SHAPE = (20, 20, 20)
T_AFF = np.array([[2.0, 0, 0, -20], [0, 2.0, 0, -20], [0, 0, 2.0, -20], [0, 0, 0, 1]])


def make_mask(border: int = 2) -> nib.Nifti1Image:
    m = np.zeros(T_SHAPE, dtype=np.uint8)
    m[border:-border, border:-border, border:-border] = 1
    return nib.Nifti1Image(m, T_AFF)


def world(aff: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """World coordinates of every voxel centre, shape (*shape, 3)."""
    ijk = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), axis=-1).astype(float)
    return ijk @ aff[:3, :3].T + aff[:3, 3]


def ramp(xyz: np.ndarray) -> np.ndarray:
    return 10.0 + 0.1 * xyz[..., 0] - 0.05 * xyz[..., 1] + 0.02 * xyz[..., 2]


MASK = make_mask()
MASK_B = np.asarray(MASK.dataobj) > 0
T_XYZ = world(T_AFF, T_SHAPE)


def grid(vox: float, shape: tuple[int, int, int], origin: float, flip_x: bool = False) -> np.ndarray:
    aff = np.diag([vox, vox, vox, 1.0])
    aff[:3, 3] = origin
    if flip_x:  # LAS: x decreases with i; keep the same world extent
        aff[0, 0] = -vox
        aff[0, 3] = origin + vox * (shape[0] - 1)
    return aff


def test_identity_grid_is_untouched_and_masked():
    rng = np.random.default_rng(0)
    data = rng.normal(size=T_SHAPE).astype(np.float32)
    data[5, 5, 5] = 0.0
    data[6, 6, 6] = np.nan
    data[7, 7, 7] = np.inf
    out, cov, method = resample_to_template(data, T_AFF, MASK, return_method=True)
    assert method == "identity"
    assert out.dtype == np.float32 and out.shape == T_SHAPE
    keep = MASK_B.copy()
    keep[5, 5, 5] = keep[6, 6, 6] = keep[7, 7, 7] = False
    np.testing.assert_array_equal(out[keep], data[keep])  # bit-identical, no interpolation
    assert np.isnan(out[~keep]).all()  # zeros, NaN, inf and everything outside the mask
    assert cov == pytest.approx((MASK_B.sum() - 3) / MASK_B.sum())


@pytest.mark.parametrize(
    ("vox", "shape", "origin"),
    [
        (3.0, (16, 16, 16), -24.0),  # 3 mm -> 2 mm
        (1.5, (30, 30, 30), -23.0),  # 1.5 mm -> 2 mm
        (2.0, (22, 22, 22), -21.0),  # 2 mm shifted by half a voxel (off the lattice)
    ],
)
@pytest.mark.parametrize("flip_x", [False, True])
def test_linear_ramp_reproduced_exactly(vox, shape, origin, flip_x):
    aff = grid(vox, shape, origin, flip_x)
    data = ramp(world(aff, shape)).astype(np.float32)
    out, cov, method = resample_to_template(data, aff, MASK, return_method=True)
    assert method == "linear"
    assert cov == 1.0  # the source field of view covers the whole mask
    expect = ramp(T_XYZ)
    np.testing.assert_allclose(out[MASK_B], expect[MASK_B], rtol=0, atol=2e-5)
    assert np.isnan(out[~MASK_B]).all()
    # a known voxel: template (10, 4, 13) is at world (0, -12, 6)
    assert out[10, 4, 13] == pytest.approx(10.0 + 0.0 + 0.6 + 0.12, abs=2e-5)


def test_las_and_ras_copies_give_the_same_map():
    shape = T_SHAPE
    ras = T_AFF
    las = grid(2.0, shape, -20.0, flip_x=True)
    rng = np.random.default_rng(1)
    data = rng.normal(size=shape).astype(np.float32)
    out_ras, _, m1 = resample_to_template(data, ras, MASK, return_method=True)
    out_las, _, m2 = resample_to_template(data[::-1], las, MASK, return_method=True)
    assert (m1, m2) == ("identity", "lattice")
    np.testing.assert_array_equal(out_ras, out_las)


def test_lattice_fast_path_equals_nilearn_linear(monkeypatch):
    # 91x109x91 LAS-like source on a larger RAS template: integer shift + flip, as the MNI grids
    shape = (17, 19, 15)
    aff = np.array([[-2.0, 0, 0, 14], [0, 2.0, 0, -22], [0, 0, 2.0, -12], [0, 0, 0, 1]])
    rng = np.random.default_rng(2)
    data = rng.normal(size=shape).astype(np.float32)
    data[rng.random(shape) < 0.1] = np.nan
    data[rng.random(shape) < 0.1] = 0
    fast, cov_fast, method = resample_to_template(data, aff, MASK, return_method=True)
    assert method == "lattice"
    monkeypatch.setattr(R, "_lattice_map", lambda *a: None)
    slow, cov_slow, method = resample_to_template(data, aff, MASK, return_method=True)
    assert method == "linear"
    np.testing.assert_array_equal(np.isnan(fast), np.isnan(slow))
    np.testing.assert_allclose(fast[np.isfinite(fast)], slow[np.isfinite(slow)], rtol=0, atol=1e-6)
    assert cov_fast == cov_slow
    # and the slice/copy equals nilearn's interpolation on the same on-lattice grid
    ref = _nilearn_normalised_linear(data, aff, MASK)
    np.testing.assert_array_equal(np.isnan(fast), np.isnan(ref))
    np.testing.assert_allclose(fast[np.isfinite(fast)], ref[np.isfinite(ref)], rtol=0, atol=1e-6)
    # spot check: template voxel (10, 10, 10) = world (0, 0, 0) = source voxel (7, 11, 6)
    for t_ijk, s_ijk in [((10, 10, 10), (7, 11, 6)), ((3, 5, 7), (14, 6, 3))]:
        v = data[s_ijk]
        if np.isfinite(v) and v != 0:
            assert fast[t_ijk] == v
        else:
            assert np.isnan(fast[t_ijk])


@pytest.mark.parametrize("background", [0.0, np.nan])
@pytest.mark.parametrize("flip_x", [False, True])
def test_background_stays_nan_without_smearing(background, flip_x):
    """A constant 5 on x < 0 and background elsewhere, 3 mm -> 2 mm."""
    vox, shape, origin = 3.0, (16, 16, 16), -24.0
    aff = grid(vox, shape, origin, flip_x)
    xyz = world(aff, shape)
    data = np.where(xyz[..., 0] < 0, 5.0, background).astype(np.float32)  # last valid centre at x = -3
    out, cov, _ = resample_to_template(data, aff, MASK, return_method=True)
    finite = np.isfinite(out)
    # values are never pulled towards the background (normalised interpolation): exactly 5 everywhere
    np.testing.assert_allclose(out[finite], 5.0, rtol=0, atol=1e-6)
    x = T_XYZ[..., 0]
    # inside the mask: data where all neighbours are valid (x <= -3), and up to half a source voxel beyond
    assert finite[MASK_B & (x <= -3)].all()
    assert finite[MASK_B & (x <= -1.5)].all()
    # ... but no value farther than half a source voxel from the last valid centre (no smearing into no data)
    assert not finite[(x > -3 + 1.5)].any()
    assert cov == pytest.approx(finite[MASK_B].mean())


def test_nan_hole_affects_only_its_one_voxel_border():
    vox, shape, origin = 3.0, (16, 16, 16), -24.0
    aff = grid(vox, shape, origin)
    xyz = world(aff, shape)
    data = ramp(xyz).astype(np.float32)
    hole = (8, 8, 8)  # world (0, 0, 0)
    data[hole] = np.nan
    out, _, _ = resample_to_template(data, aff, MASK, return_method=True)
    # the template voxel on the hole has no data
    assert np.isnan(out[10, 10, 10])
    # farther than one source voxel (3 mm) along any axis from the hole: the exact ramp
    far = (np.abs(T_XYZ) >= 3).any(axis=-1) & MASK_B
    np.testing.assert_allclose(out[far], ramp(T_XYZ)[far], rtol=0, atol=2e-5)
    # within the border, values are weighted averages of valid neighbours (bounded by their range)
    near = ~far & MASK_B & np.isfinite(out)
    assert near.any()
    lo = ramp(T_XYZ)[near] - 0.1 * 3 - 0.05 * 3 - 0.02 * 3
    hi = ramp(T_XYZ)[near] + 0.1 * 3 + 0.05 * 3 + 0.02 * 3
    assert ((out[near] >= lo) & (out[near] <= hi)).all()


def test_outside_source_field_of_view_is_nan():
    vox, shape, origin = 3.0, (6, 16, 16), -24.0  # x from -24 to -9 mm only
    aff = grid(vox, shape, origin)
    data = np.full(shape, 2.0, dtype=np.float32)
    out, cov, _ = resample_to_template(data, aff, MASK, return_method=True)
    x = T_XYZ[..., 0]
    assert np.isnan(out[x > -9 + 1.5]).all()
    assert np.isfinite(out[MASK_B & (x <= -10)]).all()
    assert 0 < cov < 0.3


def test_integer_data_and_negative_values():
    data = np.zeros(T_SHAPE, dtype=np.int16)
    data[8:12, 8:12, 8:12] = -3
    out, cov, _ = resample_to_template(data, T_AFF, MASK, return_method=True)
    assert out.dtype == np.float32
    assert (out[8:12, 8:12, 8:12] == -3).all()
    assert np.isfinite(out).sum() == 64
    assert cov == pytest.approx(64 / MASK_B.sum())


def test_rejects_non_3d():
    with pytest.raises(ValueError, match="3-D"):
        resample_to_template(np.zeros((3, 3)), T_AFF, MASK)


def test_load_mask_path_and_errors(tmp_path, monkeypatch):
    p = tmp_path / "mask.nii.gz"
    m = np.zeros(T_SHAPE, dtype=np.float32)
    m[2:5, 2:5, 2:5] = 0.7
    nib.save(nib.Nifti1Image(m, T_AFF), p)
    img = load_mask(str(p))
    assert img.shape == T_SHAPE and np.asarray(img.dataobj).sum() == 27
    assert load_mask(str(p)) is img  # cached in process
    with pytest.raises(FileNotFoundError, match="template.mask"):
        load_mask(str(tmp_path / "nope.nii.gz"))
    empty = tmp_path / "empty.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros(T_SHAPE, dtype=np.uint8), T_AFF), empty)
    with pytest.raises(ValueError, match="no voxel"):
        load_mask(str(empty))


def test_load_mask_mni152_2mm_disk_cache(tmp_path, monkeypatch):
    from nvmeta.images import template as template

    monkeypatch.setenv("NVMETA_CACHE_DIR", str(tmp_path))
    built = template._build_mni152_2mm()
    img = template._load_mni152_2mm()  # builds and writes the cache
    cached = list(tmp_path.glob("mni152_2mm_brain_mask_nilearn-*.nii.gz"))
    assert len(cached) == 1
    again = template._load_mni152_2mm()  # read from the cache
    for x in (img, again):
        assert x.shape == (99, 117, 95)
        np.testing.assert_array_equal(np.asarray(x.dataobj), np.asarray(built.dataobj))
        np.testing.assert_allclose(x.affine, built.affine)
    from nilearn.datasets import load_mni152_brain_mask

    ref = load_mni152_brain_mask(resolution=2)
    np.testing.assert_array_equal(np.asarray(again.dataobj) > 0, np.asarray(ref.dataobj) > 0)


def _nilearn_normalised_linear(data, aff, mask_img, min_weight=R.MIN_WEIGHT):
    """The previous implementation (reference): nilearn resample_img of data-with-zeros and validity."""
    import warnings

    from nilearn.image import resample_img

    valid = np.isfinite(data) & (data != 0)
    stack = np.stack([np.where(valid, data, 0), valid], axis=-1).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = resample_img(
            nib.Nifti1Image(stack, aff),
            target_affine=mask_img.affine,
            target_shape=mask_img.shape,
            interpolation="linear",
            fill_value=0,
            clip=False,
            force_resample=True,
            copy_header=True,
        )
    rd, rw = np.asarray(res.dataobj)[..., 0], np.asarray(res.dataobj)[..., 1]
    out = np.full(mask_img.shape, np.nan, dtype=np.float32)
    good = rw >= min_weight
    out[good] = (rd[good].astype(np.float64) / rw[good]).astype(np.float32)
    out[~(np.asarray(mask_img.dataobj) > 0)] = np.nan
    return out


@pytest.mark.parametrize(
    "aff",
    [
        grid(3.0, (13, 14, 12), -21.7),  # 3 mm, off the lattice
        grid(1.5, (27, 25, 26), -19.3, flip_x=True),  # 1.5 mm LAS
        np.array([[1.9, 0.3, 0, -18], [-0.3, 1.9, 0.1, -21], [0, -0.1, 2.1, -17.5], [0, 0, 0, 1]]),  # oblique
        np.array([[0, 0, 2.5, -19.1], [-1.7, 0, 0, 17.2], [0, 2.2, 0, -20.4], [0, 0, 0, 1]]),  # axes permuted
    ],
)
def test_one_pass_linear_equals_nilearn_two_volume_resampling(aff):
    # one map_coordinates call at the mask voxels == the old nilearn resample_img of (data, validity)
    shape = (13, 14, 12) if aff[0, 0] == 3.0 else ((27, 25, 26) if abs(aff[0, 0]) == 1.5 else (22, 21, 19))
    if aff[0, 0] == 0:
        shape = (23, 19, 16)
    rng = np.random.default_rng(5)
    data = rng.normal(size=shape).astype(np.float32) * 3
    data[rng.random(shape) < 0.15] = np.nan
    data[rng.random(shape) < 0.15] = 0
    data[:3] = 0  # a no-data slab
    out, cov, method = resample_to_template(data, aff, MASK, return_method=True)
    assert method == "linear"
    ref = _nilearn_normalised_linear(data, aff, MASK)
    np.testing.assert_array_equal(np.isnan(out), np.isnan(ref))
    assert np.isfinite(out).sum() > 100
    np.testing.assert_allclose(out[np.isfinite(out)], ref[np.isfinite(ref)], rtol=1e-5, atol=1e-5)
    assert cov == pytest.approx(np.isfinite(ref[MASK_B]).mean())
    # rotation-free grids take the axis-by-axis path, oblique ones the point-by-point one
    assert (R._separable(R._to_source(aff, T_AFF)) is not None) == (aff[0, 1] == 0)
