"""Per-image job: conversion, every exclusion reason, qc.json fields, outputs always complete."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from nvmeta.images.stats import t_to_z
from nvmeta.images.zmap import make_zmap
from nvmeta.workflow.config import defaults

# real maps from the bundled demo snapshot (the repository's own copy; no file outside it)
MEDIA = Path(__file__).parent / "data" / "snapshot" / "media" / "images"
PAIN_01 = MEDIA / "1425" / "pain_01.nidm" / "TStatistic.nii.gz"
TRUNCATED_GZ = MEDIA / "1425" / "contrast_.nii.gz"  # a truncated gzip stream

T_SHAPE = (20, 20, 20)
T_AFF = np.array([[2.0, 0, 0, -20], [0, 2.0, 0, -20], [0, 0, 2.0, -20], [0, 0, 0, 1]])
_m = np.zeros(T_SHAPE, dtype=np.uint8)
_m[2:-2, 2:-2, 2:-2] = 1
MASK = nib.Nifti1Image(_m, T_AFF)
MASK_B = _m > 0

QC_KEYS = {
    "image_id",
    "collection_id",
    "status",
    "reason",
    "map_type",
    "n",
    "df",
    "df_source",
    "z_min",
    "z_max",
    "max_abs_z",
    "coverage",
    "source_shape",
    "source_voxel_size",
    "source_affine_orientation",
    "resampled",
}


def t_data(seed: int = 0, shape=T_SHAPE) -> np.ndarray:
    rng = np.random.default_rng(seed)
    d = (rng.normal(size=shape) * 3).astype(np.float32)
    d[0, :, :] = 0  # FSL-style background
    return d


def record(image_id=7, map_type="T map", n=20, status="ok", reason=None, **extra) -> dict:
    rec = {
        "id": image_id,
        "collection_id": 99,
        "map_type": map_type,
        "number_of_subjects": n,
        "statistic_parameters": None,
        "nvmeta": {"status": status, "reason": reason, "source_format": "nii.gz"},
    }
    rec.update(extra)
    return rec


def run(tmp_path: Path, rec: dict, img=None, map_file: Path | None = None, mask=MASK, conversion=None):
    d = tmp_path / "images" / str(rec["id"])
    d.mkdir(parents=True, exist_ok=True)
    (d / "metadata.json").write_text(json.dumps(rec))
    map_path = d / "map.nii.gz"
    if img is not None:
        nib.save(img, map_path)
    elif map_file is not None:
        map_path = map_file
    qc = make_zmap(
        d / "metadata.json",
        map_path,
        mask,
        {**defaults("conversion"), **(conversion or {})},
        d / "zmap.nii.gz",
        d / "qc.json",
        defaults("qc"),
    )
    # outputs always complete, qc.json == returned dict, zmap on the template grid as float32
    assert json.loads((d / "qc.json").read_text()) == qc
    z = nib.load(d / "zmap.nii.gz")
    assert z.shape == mask.shape and np.allclose(z.affine, mask.affine)
    assert z.get_data_dtype() == np.float32
    zdata = np.asarray(z.dataobj)
    if qc["status"] == "excluded":
        assert np.isnan(zdata).all()
    assert QC_KEYS <= set(qc)
    assert not list(d.glob(".*part*"))  # no temporary files left behind
    return qc, zdata


def test_t_map_converted_exactly(tmp_path):
    t = t_data()
    qc, z = run(tmp_path, record(n=20), nib.Nifti1Image(t, T_AFF))
    assert qc["status"] == "included" and qc["reason"] is None
    assert (qc["df"], qc["df_source"], qc["n"]) == (18.0, "n-2", 20)
    for ijk in [(5, 5, 5), (10, 3, 17), (16, 16, 2)]:
        assert z[ijk] == pytest.approx(t_to_z(float(t[ijk]), 18.0), rel=1e-6)
    ok = MASK_B.copy()
    ok[0] = False
    np.testing.assert_allclose(z[ok], t_to_z(t[ok].astype(np.float64), 18.0), rtol=1e-6)
    assert np.isnan(z[~MASK_B]).all()
    assert qc["coverage"] == 1.0
    assert qc["z_max"] == pytest.approx(float(np.nanmax(z))) and qc["z_min"] == pytest.approx(
        float(np.nanmin(z))
    )
    assert qc["max_abs_z"] == max(-qc["z_min"], qc["z_max"])
    assert qc["source_shape"] == [20, 20, 20] and qc["source_voxel_size"] == [2.0, 2.0, 2.0]
    assert qc["source_affine_orientation"] == "RAS" and qc["resampled"] is False


def test_df_sources(tmp_path):
    t = t_data()
    qc, z = run(tmp_path, record(n=20, statistic_parameters=14.0), nib.Nifti1Image(t, T_AFF))
    assert (qc["df"], qc["df_source"]) == (14.0, "statistic_parameters")
    assert z[5, 5, 5] == pytest.approx(t_to_z(float(t[5, 5, 5]), 14.0), rel=1e-6)
    qc, _ = run(tmp_path, record(image_id=8, n=20), nib.Nifti1Image(t, T_AFF), conversion={"df": "n-1"})
    assert (qc["df"], qc["df_source"]) == (19.0, "n-1")
    qc, _ = run(
        tmp_path,
        record(image_id=9, n=0),
        nib.Nifti1Image(t, T_AFF),
        conversion={"df": "n-2", "n_collections": {"99": 12}},
    )
    assert (qc["df"], qc["df_source"], qc["n"]) == (10.0, "n-2", 12)


def test_z_map_used_as_is_and_las_source(tmp_path):
    z0 = t_data(1)
    las = T_AFF.copy()
    las[0, 0], las[0, 3] = -2.0, 18.0
    qc, z = run(tmp_path, record(map_type="Z map", n=None), nib.Nifti1Image(z0[::-1].copy(), las))
    assert qc["status"] == "included" and qc["df_source"] == "z map" and qc["df"] is None
    assert qc["source_affine_orientation"] == "LAS" and qc["resampled"] is True
    ok = MASK_B.copy()
    ok[0] = False
    np.testing.assert_array_equal(z[ok], z0[ok])


def test_integer_dtype_with_scl_slope(tmp_path):
    raw = np.zeros(T_SHAPE, dtype=np.int16)
    raw[4:16, 4:16, 4:16] = np.arange(12**3).reshape(12, 12, 12) - 800
    img = nib.Nifti1Image(raw, T_AFF)
    img.header.set_data_dtype(np.int16)
    img.header.set_slope_inter(0.01, 0.0)
    qc, z = run(tmp_path, record(map_type="Z map"), img)
    assert qc["status"] == "included"
    assert z[4, 4, 4] == pytest.approx(-8.0, abs=1e-5)
    assert z[15, 15, 15] == pytest.approx((12**3 - 1 - 800) * 0.01, abs=1e-4)
    assert np.isnan(z[3, 3, 3])  # zero background
    assert np.isnan(z[(raw == 0) & MASK_B]).all()  # incl. the one stored 0 inside the cube (-800 + 800)
    assert np.isfinite(z[(raw != 0) & MASK_B]).all()


def test_five_d_with_one_volume_is_squeezed(tmp_path):
    t = t_data(2)
    qc, z = run(tmp_path, record(), nib.Nifti1Image(t.reshape(*T_SHAPE, 1, 1), T_AFF))
    assert qc["status"] == "included" and qc["source_shape"] == [20, 20, 20, 1, 1]
    assert z[6, 7, 8] == pytest.approx(t_to_z(float(t[6, 7, 8]), 18.0), rel=1e-6)


def test_analyze_pair_converted(tmp_path):
    """SPM Analyze pair (df 14 in its header) converted to NIfTI, as the download step does."""
    ana = nib.load(MEDIA / "1617" / "box_0b_vs_1b.hdr")
    nii = nib.Nifti1Image(np.asarray(ana.dataobj), ana.affine)
    qc, z = run(tmp_path, record(map_type="T map", n=None, statistic_parameters=14), nii)
    assert qc["status"] == "included" and qc["df"] == 14.0
    assert qc["source_shape"] == [79, 95, 78] and qc["resample_method"] == "lattice"
    # the .hdr path is read directly too, with the same result
    d = tmp_path / "direct"
    shutil.copy(MEDIA / "1617" / "box_0b_vs_1b.hdr", d.with_suffix(".hdr"))
    shutil.copy(MEDIA / "1617" / "box_0b_vs_1b.img", d.with_suffix(".img"))
    qc2, z2 = run(
        tmp_path, record(image_id=70, n=None, statistic_parameters=14), map_file=d.with_suffix(".hdr")
    )
    assert qc2["status"] == "included"
    np.testing.assert_array_equal(z, z2)


def _lying_header(path: Path) -> None:
    """Write a NIfTI whose header claims twice the voxels its data hold."""
    img = nib.Nifti1Image(t_data(3), T_AFF)
    raw = path.with_suffix("")  # .nii
    nib.save(img, raw)
    b = bytearray(raw.read_bytes())
    hdr = np.frombuffer(bytes(b[40:56]), dtype="<i2").copy()  # dim[0..7]
    hdr[3] = 40
    b[40:56] = hdr.tobytes()
    raw.write_bytes(bytes(b))
    with gzip.open(path, "wb") as f:
        f.write(bytes(b))


EXCLUSIONS = [
    ("download", "download failed: HTTP 404 not found"),
    ("ftype", "map type not usable: F map"),
    ("ptype", "map type not usable: P map (given null hypothesis)"),
    ("other", "map type not usable: other"),
    ("none", "map type not usable: None"),
    ("nidm_n0", "missing sample size"),
    ("n_small", "implausible sample size: number_of_subjects = 2 leaves no degrees of freedom for a t map"),
    ("two_volumes", "too many volumes: 2 (AFNI sub-brick selection not supported yet)"),
    ("truncated", "unreadable map: "),
    ("lying", "unreadable map: "),
    ("not_nifti", "unreadable map: "),
    ("all_nan", "no finite data"),
    ("all_zero", "all zero"),
    ("constant", "constant map"),
    ("huge", "implausible values"),
    ("huge64", "implausible values"),
    ("outside", "no data inside the template mask"),
    ("outside_linear", "no data inside the template mask"),
    ("outside_linear_far", "no data inside the template mask"),
]


@pytest.mark.parametrize(("case", "reason"), EXCLUSIONS)
def test_every_exclusion_reason(tmp_path, case, reason):
    t = t_data(4)
    img = nib.Nifti1Image(t, T_AFF)
    map_file = None
    rec = record()
    if case == "download":
        rec = record(status="failed", reason="HTTP 404 not found")
        img = None
        map_file = tmp_path / "missing.nii.gz"
    elif case == "ftype":
        rec = record(map_type="F map")
    elif case == "ptype":
        rec = record(map_type="P map (given null hypothesis)")
    elif case == "other":
        rec = record(map_type="other")
    elif case == "none":
        rec = record(map_type=None)
    elif case == "nidm_n0":
        rec = record(n=0, analysis_level="other")
    elif case == "n_small":
        rec = record(n=2)
    elif case == "two_volumes":
        img = nib.Nifti1Image(np.stack([t, t], axis=-1).reshape(*T_SHAPE, 1, 2), T_AFF)
    elif case == "truncated":
        img = None
        map_file = tmp_path / "trunc.nii.gz"
        shutil.copy(TRUNCATED_GZ, map_file)
    elif case == "lying":
        img = None
        map_file = tmp_path / "lying.nii.gz"
        _lying_header(map_file)
    elif case == "not_nifti":
        img = None
        map_file = tmp_path / "html.nii.gz"
        map_file.write_bytes(gzip.compress(b"<html>Bad gateway</html>"))
    elif case == "all_nan":
        img = nib.Nifti1Image(np.full(T_SHAPE, np.nan, dtype=np.float32), T_AFF)
    elif case == "all_zero":
        img = nib.Nifti1Image(np.zeros(T_SHAPE, dtype=np.float32), T_AFF)
    elif case == "constant":
        c = np.zeros(T_SHAPE, dtype=np.float32)
        c[5:9, 5:9, 5:9] = 1.0  # an ROI mask uploaded as a T map
        c[0, 0, 0] = np.nan
        img = nib.Nifti1Image(c, T_AFF)
    elif case == "huge":
        h = t.copy()
        h[5, 5, 5] = 1e30
        img = nib.Nifti1Image(h, T_AFF)
    elif case == "huge64":
        h = t.astype(np.float64)
        h[5, 5, 5] = 1e300  # beyond float32: must not silently become inf/no data
        img = nib.Nifti1Image(h, T_AFF)
    elif case == "outside":
        far = T_AFF.copy()
        far[:3, 3] += 500.0
        img = nib.Nifti1Image(t, far)
    elif case in ("outside_linear", "outside_linear_far"):
        far = np.diag([3.0, 3.0, 3.0, 1.0])
        far[:3, 3] = 30.3 if case == "outside_linear" else -501.3  # off the lattice: interpolation path
        far_t = t.copy()
        far_t[:5] = 0  # the only voxels near the template box carry no data
        img = nib.Nifti1Image(far_t, far)
    qc, _ = run(tmp_path, rec, img, map_file=map_file)
    assert qc["status"] == "excluded"
    assert qc["reason"].startswith(reason), qc["reason"]
    assert qc["image_id"] == 7 and qc["collection_id"] == 99


def test_unexpected_error_is_an_exclusion_not_a_crash(tmp_path, monkeypatch):
    import nvmeta.images.stats

    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(nvmeta.images.stats, "t_to_z", boom)
    qc, _ = run(tmp_path, record(), nib.Nifti1Image(t_data(), T_AFF))
    assert qc["status"] == "excluded" and qc["reason"] == "processing error: RuntimeError: boom"


def test_unreadable_reason_is_specific(tmp_path):
    map_file = tmp_path / "trunc.nii.gz"
    shutil.copy(TRUNCATED_GZ, map_file)
    qc, _ = run(tmp_path, record(), map_file=map_file)
    assert qc["reason"].startswith("unreadable map: ") and len(qc["reason"]) > len("unreadable map: ") + 5
    assert str(tmp_path) not in qc["reason"]
    html = tmp_path / "page.nii.gz"
    html.write_bytes(gzip.compress(b"<html>Bad gateway</html>"))
    qc, _ = run(tmp_path, record(image_id=8), map_file=html)
    assert qc["reason"].startswith("unreadable map: ") and str(tmp_path) not in qc["reason"]


def test_real_afni_5d_two_subbricks(tmp_path):
    qc, _ = run(tmp_path, record(map_type="T map", n=23), map_file=MEDIA / "1616" / "saccade.I_C.MNI.nii.gz")
    assert qc["reason"] == "too many volumes: 2 (AFNI sub-brick selection not supported yet)"
    assert qc["source_shape"] == [91, 109, 91, 1, 2] and qc["source_affine_orientation"] == "RAS"


def test_real_pain_map_on_mni152_2mm(tmp_path, monkeypatch):
    monkeypatch.setenv("NVMETA_CACHE_DIR", str(tmp_path / "cache"))
    from nvmeta.images.template import load_mask

    mask = load_mask("mni152_2mm")
    src = nib.load(PAIN_01)
    t = src.get_fdata(dtype=np.float32)
    rec = record(image_id=23411, n=25)
    qc, z = run(tmp_path, rec, map_file=PAIN_01, mask=mask)
    assert qc["status"] == "included" and qc["df"] == 23.0
    assert qc["source_affine_orientation"] == "LAS" and qc["source_shape"] == [91, 109, 91]
    mb = np.asarray(mask.dataobj) > 0
    # template voxel -> world -> source voxel (integer: both grids are 2 mm MNI)
    for ijk in [(49, 60, 40), (30, 50, 50), (60, 70, 30)]:
        xyz = mask.affine @ [*ijk, 1]
        s = np.linalg.solve(src.affine, xyz)[:3]
        assert np.allclose(s, np.round(s))
        tv = t[tuple(np.round(s).astype(int))]
        if tv != 0 and mb[ijk]:
            assert z[ijk] == pytest.approx(t_to_z(float(tv), 23.0), rel=1e-6)
        else:
            assert np.isnan(z[ijk])
    # every template voxel with data maps onto a non-zero source voxel; coverage as reported
    assert qc["coverage"] == pytest.approx(np.isfinite(z[mb]).mean(), abs=1e-6)
    assert 0.85 < qc["coverage"] < 0.95
    assert np.isnan(z[~mb]).all()
    ref_max = t_to_z(float(t[mb_source_mask(src, mask)].max()), 23.0)
    assert qc["z_max"] == pytest.approx(ref_max, rel=1e-6)


def mb_source_mask(src: nib.Nifti1Image, mask: nib.Nifti1Image) -> np.ndarray:
    """Source voxels that fall inside the template mask (integer lattice mapping)."""
    mb = np.asarray(mask.dataobj) > 0
    ijk = np.argwhere(mb)
    xyz = ijk @ mask.affine[:3, :3].T + mask.affine[:3, 3]
    s = np.round((xyz - src.affine[:3, 3]) @ np.linalg.inv(src.affine[:3, :3]).T).astype(int)
    inside = ((s >= 0) & (s < src.shape[:3])).all(axis=1)
    out = np.zeros(src.shape[:3], dtype=bool)
    out[tuple(s[inside].T)] = True
    return out


def test_real_z_map_with_nan_background(tmp_path):
    qc, z = run(tmp_path, record(map_type="Z map", n=None), map_file=MEDIA / "1615" / "motor_lips_nan.nii.gz")
    assert qc["status"] == "included" and qc["df_source"] == "z map"
    assert qc["resample_method"] in ("lattice", "linear")
    assert 0 < qc["coverage"] <= 1 and np.isfinite(z).any()


def test_cli(tmp_path):
    from nvmeta.images.zmap import main

    d = tmp_path / "images" / "7"
    d.mkdir(parents=True)
    (d / "metadata.json").write_text(json.dumps(record()))
    mask_path = tmp_path / "mask.nii.gz"
    nib.save(MASK, mask_path)
    nib.save(nib.Nifti1Image(t_data(), T_AFF), d / "map.nii.gz")
    assert (
        main(
            [
                str(d / "metadata.json"),
                str(d / "map.nii.gz"),
                str(d / "z.nii.gz"),
                str(d / "q.json"),
                "--mask",
                str(mask_path),
            ]
        )
        == 0
    )
    assert json.loads((d / "q.json").read_text())["status"] == "included"


# ---------------------------------------------------------------------------------------
# One resolved sample size per image, in qc.json
# ---------------------------------------------------------------------------------------


def test_n_override_resolved_once_into_qc_json(tmp_path):
    # NIDM-style record: number_of_subjects = 0; the user's conversion.n_images gives 20
    t = t_data(11)
    conv = {"df": "n-2", "n_images": {"7": 20}}
    qc, z = run(tmp_path, record(n=0), nib.Nifti1Image(t, T_AFF), conversion=conv)
    assert qc["status"] == "included"
    assert (qc["n"], qc["n_source"]) == (20, "n_images")
    assert (qc["df"], qc["df_source"]) == (18.0, "n-2")  # df consistent with the same n
    fin = np.isfinite(z)
    np.testing.assert_allclose(z[fin], t_to_z(t[fin], 18.0), rtol=1e-6)
    # the record's own n wins when usable, with its source
    qc2, _ = run(tmp_path, record(image_id=8, n=25), nib.Nifti1Image(t, T_AFF), conversion=conv)
    assert (qc2["n"], qc2["n_source"], qc2["df"]) == (25, "number_of_subjects", 23.0)
    # collection override; statistic_parameters gives the df while n stays the resolved one
    conv3 = {"df": "n-1", "n_collections": {"99": 30}}
    rec3 = record(image_id=9, n=None, statistic_parameters=27.0)
    qc3, _ = run(tmp_path, rec3, nib.Nifti1Image(t, T_AFF), conversion=conv3)
    assert (qc3["n"], qc3["n_source"], qc3["df"], qc3["df_source"]) == (
        30,
        "n_collections",
        27.0,
        "statistic_parameters",
    )
    # Z maps carry their n too (weights read it); excluded images still report the resolved n
    qc4, _ = run(
        tmp_path, record(image_id=10, map_type="Z map", n=0), nib.Nifti1Image(t, T_AFF), conversion=conv3
    )
    assert (qc4["n"], qc4["n_source"], qc4["df_source"]) == (30, "n_collections", "z map")
    qc5, _ = run(
        tmp_path, record(image_id=7, map_type="F map", n=0), nib.Nifti1Image(t, T_AFF), conversion=conv
    )
    assert qc5["status"] == "excluded" and (qc5["n"], qc5["n_source"]) == (20, "n_images")


# ---------------------------------------------------------------------------------------
# Plausibility rules: implausible statistics are excluded with a specific reason
# ---------------------------------------------------------------------------------------

SNAPSHOT = Path(__file__).parent / "data" / "snapshot"


def _snapshot_maps():
    manifest = json.loads((SNAPSHOT / "MANIFEST.json").read_text())
    return {m["image_id"]: SNAPSHOT / m["path"] for m in manifest}


def test_t_map_scaled_by_1000_is_excluded_as_implausible_effect(tmp_path):
    # the demo's pain_01 T map x1000 at n = 20: max |t| = 10,161 -> z ~ 19 would pass max |z| <= 50
    src = nib.load(_snapshot_maps()[990001])
    t = np.asarray(src.dataobj, dtype=np.float32)
    scaled = nib.Nifti1Image(t * 1000, src.affine)
    qc, _ = run(tmp_path, record(n=20), scaled)
    assert qc["status"] == "excluded"
    assert qc["reason"].startswith(
        "implausible effect size: max |t| / sqrt(n) = 2.27e+03 > qc.max_t_per_sqrt_n = 20"
    )
    assert qc["source_max_abs"] == pytest.approx(10161.0, rel=1e-4)
    # the unscaled map is fine (2.27 at n = 20) and so is the limit when raised
    qc_ok, _ = run(tmp_path, record(image_id=8, n=20), nib.Nifti1Image(t, src.affine))
    assert qc_ok["status"] == "included" and qc_ok["max_abs_z"] < 8
    # without n the df stands in (sqrt(df + 1))
    qc_df, _ = run(tmp_path, record(image_id=9, n=None, statistic_parameters=19), scaled)
    assert qc_df["reason"].startswith("implausible effect size: max |t| / sqrt(df + 1) = 2.27e+03")


@pytest.mark.parametrize(
    ("fields", "conversion", "reason"),
    [
        ({"n": 1e9}, {}, "implausible sample size: number_of_subjects = 1e+09 > qc.max_n = 100000"),
        (
            {"n": None, "statistic_parameters": 1e300},
            {},
            "implausible degrees of freedom: statistic_parameters = 1e+300 > qc.max_n = 100000",
        ),
        ({"n": 20.5}, {}, "implausible sample size: number_of_subjects = 20.5 is not an integer"),
        ({"n": 0}, {"n_images": {"7": 12.5}}, "implausible sample size: n_images = 12.5 is not an integer"),
        (
            {"n": 20.5, "map_type": "Z map"},
            {},
            "implausible sample size: number_of_subjects = 20.5 is not an integer",
        ),
    ],
)
def test_implausible_n_and_df_are_excluded(tmp_path, fields, conversion, reason):
    fields = dict(fields)
    rec = record(n=fields.pop("n"), **fields)
    qc, _ = run(tmp_path, rec, nib.Nifti1Image(t_data(12), T_AFF), conversion={"df": "n-2", **conversion})
    assert qc["status"] == "excluded"
    assert qc["reason"].startswith(reason)
    assert qc["n"] is None and qc["df"] is None


def test_implausible_record_n_can_be_overridden(tmp_path):
    # 20.5 is not a sample size; the user's n_images replaces it, and df and qc.json agree
    conv = {"df": "n-2", "n_images": {"7": 20}}
    qc, _ = run(tmp_path, record(n=20.5), nib.Nifti1Image(t_data(12), T_AFF), conversion=conv)
    assert qc["status"] == "included"
    assert (qc["n"], qc["n_source"], qc["df"], qc["df_source"]) == (20, "n_images", 18.0, "n-2")


def test_limits_are_config_keys(tmp_path):
    from nvmeta.workflow.config import defaults

    limits = {**defaults("qc"), "max_n": 1e10, "max_t_per_sqrt_n": 1e6}
    d = tmp_path / "images" / "7"
    d.mkdir(parents=True)
    (d / "metadata.json").write_text(json.dumps(record(n=1e9)))
    nib.save(nib.Nifti1Image(t_data(12) * 1000, T_AFF), d / "map.nii.gz")
    qc = make_zmap(
        d / "metadata.json",
        d / "map.nii.gz",
        MASK,
        {**defaults("conversion"), "df": "n-2"},
        d / "z.nii.gz",
        d / "qc.json",
        limits,
    )
    assert qc["status"] == "included" and qc["n"] == 10**9


def test_every_demo_map_passes_the_plausibility_rules(tmp_path):
    # defaults keep the demo: the 21 pain maps (and every other readable demo map) stay included
    maps = _snapshot_maps()
    included = set()
    for f in sorted((SNAPSHOT / "api" / "images").glob("*.json")):
        rec = json.loads(f.read_text())
        if rec["id"] not in maps or rec.get("map_type") not in ("T map", "Z map"):
            continue
        rec["nvmeta"] = {"status": "ok", "reason": None}
        d = tmp_path / str(rec["id"])
        d.mkdir()
        (d / "metadata.json").write_text(json.dumps(rec))
        src = maps[rec["id"]]
        conv = {"df": "n-2", "n_images": {"10426": 20}}
        qc = make_zmap(
            d / "metadata.json",
            src,
            MASK,
            {**defaults("conversion"), **conv},
            d / "zmap.nii.gz",
            d / "qc.json",
            defaults("qc"),
        )
        if qc["status"] == "included":
            included.add(rec["id"])
        else:
            assert not qc["reason"].startswith(("implausible", "map too large")), (rec["id"], qc["reason"])
    assert set(range(990001, 990022)) <= included


# ---------------------------------------------------------------------------------------
# Memory: a bound from the header, one float32 read, peak within mem_mb
# ---------------------------------------------------------------------------------------


def _header_only_gz(path: Path, shape, dtype) -> None:
    """A gzipped NIfTI whose header promises ``shape`` x ``dtype`` but holds only 1 KB of data."""
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(shape)
    hdr.set_data_dtype(dtype)
    hdr.set_qform(np.diag([0.5, 0.5, 0.5, 1.0]), code=1)
    hdr.set_sform(np.diag([0.5, 0.5, 0.5, 1.0]), code=1)
    raw = hdr.binaryblock + b"\0" * 4 + b"\0" * 1024
    path.write_bytes(gzip.compress(raw))


def test_oversized_map_excluded_from_its_header_before_reading(tmp_path):
    # a 400^3 float64 header (512 MB decoded); the data are truncated, so reading them would fail
    # with "unreadable map: EOFError ...": the size rule must fire first, from the header alone
    f = tmp_path / "huge.nii.gz"
    _header_only_gz(f, (400, 400, 400), np.float64)
    qc, _ = run(tmp_path, record(), map_file=f)
    assert qc["status"] == "excluded"
    assert qc["reason"] == (
        "map too large: header says 400x400x400 voxels = 256 MB as float32 > qc.max_map_mb = 240 (not read)"
    )
    assert qc["source_shape"] == [400, 400, 400]
    # the same truncated file under a raised limit is read, and fails as unreadable
    from nvmeta.workflow.config import defaults

    d = tmp_path / "images" / "7"
    qc2 = make_zmap(
        d / "metadata.json",
        f,
        MASK,
        {**defaults("conversion"), "df": "n-2"},
        d / "zmap.nii.gz",
        d / "qc.json",
        {**defaults("qc"), "max_map_mb": 1e4},
    )
    assert qc2["reason"].startswith("unreadable map: "), qc2["reason"]


_MEM_JOB = r"""
import json, sys
import numpy as np, nibabel as nib
from nvmeta.images.zmap import make_zmap
import nvmeta.images.resample, nvmeta.images.stats, scipy.ndimage

def hwm():  # peak RSS of this process (VmHWM; getrusage's maxrss would include the parent at fork)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024

d = sys.argv[1]
mask = nib.load(d + "/mask.nii.gz")
mask = nib.Nifti1Image(np.asarray(mask.dataobj), mask.affine)
from nvmeta.workflow.config import defaults
conversion, limits = {**defaults("conversion"), "df": "n-2"}, defaults("qc")
base = hwm()
qc = make_zmap(d + "/metadata.json", d + "/map.nii.gz", mask, conversion, d + "/z.nii.gz", d + "/qc.json", limits)
print(json.dumps({"base": base, "peak": hwm(), "status": qc["status"], "reason": qc["reason"]}))
"""


def _job_peak_mb(d: Path, shape, vox_mm: float) -> dict:
    """Peak RSS of make_zmap in a fresh process on a float64 map of ``shape`` covering the same 200 mm box."""
    import os
    import subprocess
    import sys

    d.mkdir()
    data = np.full(shape, 0.5)
    c = [s // 2 for s in shape]
    r = shape[0] // 10
    data[c[0] - r : c[0] + r, c[1] - r : c[1] + r, c[2] - r : c[2] + r] = 6.0
    aff = np.diag([vox_mm, vox_mm, vox_mm, 1.0])
    aff[:3, 3] = -100.3  # off the template lattice: the interpolation path
    nib.save(nib.Nifti1Image(data, aff), d / "map.nii.gz")
    m = np.zeros((100, 100, 100), dtype=np.uint8)
    m[10:90, 10:90, 10:90] = 1
    mask_aff = np.diag([2.0, 2.0, 2.0, 1.0])
    mask_aff[:3, 3] = -100
    nib.save(nib.Nifti1Image(m, mask_aff), d / "mask.nii.gz")
    (d / "metadata.json").write_text(json.dumps(record(n=20)))
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    res = subprocess.run(
        [sys.executable, "-c", _MEM_JOB, str(d)], env=env, cwd=d, capture_output=True, text=True, check=True
    )
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["status"] == "included", out
    return out


def test_large_allowed_map_stays_within_declared_memory(tmp_path):
    import re

    from nvmeta.workflow.config import defaults

    # the same 200 mm box at 2 mm (1M voxels) and at 1 mm (8M voxels), float64, data in every voxel;
    # the difference of the peaks is what the job needs per source voxel (fixed costs cancel)
    small = _job_peak_mb(tmp_path / "small", (100, 100, 100), 2.0)
    big = _job_peak_mb(tmp_path / "big", (200, 200, 200), 1.0)
    per_voxel = ((big["peak"] - big["base"]) - (small["peak"] - small["base"])) * 1e6 / (200**3 - 100**3)
    # one float32 copy, the validity and the 2-channel interpolation stack: ~15 B/voxel measured
    # (before: float64 copies and float64 t -> z temporaries on every voxel: ~50 B/voxel)
    assert per_voxel < 18, f"{per_voxel:.1f} B/voxel"
    # at that rate the largest map qc.max_map_mb admits fits the rule's declared mem_mb
    smk = (Path(__file__).resolve().parents[1] / "workflow" / "rules" / "zmap.smk").read_text()
    mem_mb = int(re.search(r"mem_mb=(\d+)", smk).group(1))
    max_vox = defaults("qc")["max_map_mb"] * 1e6 / 4
    fixed = small["peak"]  # interpreter, imports, mask and a 1M-voxel map
    assert fixed + 18 * max_vox / 1e6 <= mem_mb


def test_df_override_that_has_no_effect_is_said(tmp_path, caplog):
    """A conversion.df_images value for an image whose record gives a sample size is not used (the
    n rule comes first): the job says so in its log and in qc.json instead of ignoring it silently."""
    import logging

    t = t_data(11)
    conv = {"df": "n-2", "df_images": {"7": 5}}
    with caplog.at_level(logging.WARNING, logger="nvmeta.images.zmap"):
        qc, z = run(tmp_path, record(n=20), nib.Nifti1Image(t, T_AFF), conversion=conv)
    assert qc["status"] == "included" and (qc["df"], qc["df_source"]) == (18.0, "n-2")
    assert "conversion.df_images[7] = 5 not used" in qc["ignored_override"]
    assert any("df_images[7] = 5 not used" in r.getMessage() for r in caplog.records)
    # used when the record has no sample size: nothing to say
    qc2, _ = run(
        tmp_path,
        record(image_id=8, n=None),
        nib.Nifti1Image(t, T_AFF),
        conversion={"df": "n-2", "df_images": {"8": 5}},
    )
    assert (qc2["df"], qc2["df_source"]) == (5.0, "override_image") and "ignored_override" not in qc2


# ---------------------------------------------------------------------------------------
# A given but unusable sample size has its own reason, never "missing sample size"
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "map_type", "reason"),
    [
        ("twenty", "T map", "implausible sample size: number_of_subjects 'twenty' is not a number"),
        ("nan", "T map", "implausible sample size: number_of_subjects 'nan' is not a number"),
        ("0x14", "T map", "implausible sample size: number_of_subjects '0x14' is not a number"),
        ("inf", "T map", "implausible sample size: number_of_subjects 'inf' is not a number"),
        (True, "T map", "implausible sample size: number_of_subjects True is not a number"),
        ("1e400", "T map", "implausible sample size: number_of_subjects = '1e400' is not finite"),
        (float("inf"), "T map", "implausible sample size: number_of_subjects = inf is not finite"),
        (10**400, "T map", "implausible sample size: number_of_subjects = 1000000000"),
        (-5, "T map", "implausible sample size: number_of_subjects = -5 is negative"),
        ("twenty", "Z map", "implausible sample size: number_of_subjects 'twenty' is not a number"),
        (
            1,
            "T map",
            "implausible sample size: number_of_subjects = 1 leaves no degrees of freedom for a t map "
            "(df = n - 2 = -1 by the 'n-2' rule",
        ),
    ],
    ids=lambda v: repr(v)[:16],
)
def test_unusable_number_of_subjects_has_its_own_reason(tmp_path, n, map_type, reason):
    # metadata.json as the download writes it (json.dumps turns inf into Infinity, read back as inf)
    rec = record(n=n, map_type=map_type, statistic_parameters=None)
    qc, _ = run(tmp_path, rec, nib.Nifti1Image(t_data(12), T_AFF))
    assert qc["status"] == "excluded"
    assert qc["reason"].startswith(reason), qc["reason"]
    assert qc["n"] is None or (type(n) is int and qc["n"] == 1)
    # the user's override still rescues the image, and every consumer then reads that n
    conv = {"df": "n-2", "n_images": {"7": 20}}
    qc2, _ = run(
        tmp_path, record(n=n, map_type=map_type), nib.Nifti1Image(t_data(12), T_AFF), conversion=conv
    )
    if type(n) is int and n == 1:  # a usable (if tiny) n comes first; a df override rescues it
        assert qc2["status"] == "excluded"
    else:
        assert qc2["status"] == "included" and (qc2["n"], qc2["n_source"]) == (20, "n_images")


def _with_effects(tmp_path: Path, rec: dict, t: np.ndarray, conversion: dict) -> tuple[dict, np.ndarray]:
    d = tmp_path / "images" / str(rec["id"])
    d.mkdir(parents=True, exist_ok=True)
    (d / "metadata.json").write_text(json.dumps(rec))
    nib.save(nib.Nifti1Image(t, T_AFF), d / "map.nii.gz")
    qc = make_zmap(
        d / "metadata.json",
        d / "map.nii.gz",
        MASK,
        {**defaults("conversion"), **conversion},
        d / "zmap.nii.gz",
        d / "qc.json",
        defaults("qc"),
        out_effects=(d / "g.nii.gz", d / "varg.nii.gz"),
    )
    return qc, np.asarray(nib.load(d / "g.nii.gz").dataobj, dtype=np.float64)


def test_two_sample_design_and_record_n_are_one_n(tmp_path):
    """n1 + n2 = 100 with number_of_subjects = 25 gave g from 50/50 and sqrt(n) weights from 25."""
    t = t_data(13)
    design = {"design_images": {"7": {"design": "two_sample", "n1": 50, "n2": 50}}}
    qc, g = _with_effects(tmp_path, record(n=25), t, {"df": "n-2", **design})
    assert qc["status"] == "excluded" and qc["n"] is None and np.isnan(g).all()
    assert qc["reason"] == (
        "sample size conflict: number_of_subjects = 25 but conversion.design_images[7] declares "
        "n1 + n2 = 50 + 50 = 100 (an image has one n: fix n1 and n2)"
    )
    # a record without n: n1 + n2 is the image's n, the df n1 + n2 - 2 (whatever conversion.df says)
    qc2, g2 = _with_effects(
        tmp_path,
        record(image_id=8, n=None),
        t,
        {"df": "n-1", "design_images": {"8": {"design": "two_sample", "n1": 12, "n2": 8}}},
    )
    assert qc2["status"] == "included"
    assert (qc2["n"], qc2["n_source"], qc2["df"], qc2["df_source"]) == (
        20,
        "design_images",
        18.0,
        "two_sample",
    )
    # g by hand (Hedges & Olkin): d = t sqrt(1/n1 + 1/n2), J = 1 - 3 / (4 (n1 + n2 - 2) - 1)
    hand = (1 - 3 / (4 * 18 - 1)) * t.astype(np.float64) * np.sqrt(1 / 12 + 1 / 8)
    inside = MASK_B & (t != 0)
    np.testing.assert_allclose(g2[inside], hand[inside], rtol=1e-5, atol=1e-6)
    # the same n on both sides is fine, and the record's statistic_parameters still give the df
    qc3, _ = _with_effects(
        tmp_path,
        record(image_id=9, n=20, statistic_parameters=18),
        t,
        {"df": "n-2", "design_images": {"9": {"design": "two_sample", "n1": 12, "n2": 8}}},
    )
    assert (qc3["status"], qc3["n"], qc3["df_source"]) == ("included", 20, "statistic_parameters")


def test_z_map_effect_sizes_use_the_resolved_n_and_df(tmp_path):
    """A Z map's g used to re-resolve df from the record without qc.max_n: number_of_subjects = 1e9
    (> max_n, replaced by n_images = 20) gave weights from n = 20 and z -> t with df = 1e9 - 2."""
    from nvmeta.images.effectsize import one_sample, z_to_t

    z = t_data(14)
    conv = {"df": "n-2", "n_images": {"7": 20}}
    qc, g = _with_effects(tmp_path, record(n=1e9, map_type="Z map"), z, conv)
    assert qc["status"] == "included" and (qc["n"], qc["n_source"]) == (20, "n_images")
    inside = MASK_B & (z != 0)
    expected = one_sample(z_to_t(z[inside].astype(np.float64), 18.0), 20)[1]
    np.testing.assert_allclose(g[inside], expected, rtol=1e-5, atol=1e-6)
