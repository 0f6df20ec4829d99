"""Issue 10, meta parts: every meta result is right, or says loudly why not.

- item 2: weighted_stouffer weights come from the image's one resolved sample size (qc.json's n,
  including conversion.n_images overrides), not from the NeuroVault record;
- item 8: permutation runs with the rule's threads and records n_jobs in summary.json;
- item 9: p-maps keep their smallest values (p float64, logp.nii.gz = -log10 p);
- item 10: a meta job sweeps the temporaries a killed earlier attempt left in its directory.
"""

from __future__ import annotations

import json
import math

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from scipy import special, stats

from nvmeta.meta import run_method
from nvmeta.workflow.config import defaults

AFFINE = np.array([[3.0, 0, 0, -15], [0, 3.0, 0, -15], [0, 0, 3.0, -9], [0, 0, 0, 1]])
SHAPE = (8, 8, 6)


def _mask():
    m = np.zeros(SHAPE, np.uint8)
    m[1:-1, 1:-1, 1:-1] = 1
    return nib.Nifti1Image(m, AFFINE)


def _write_qc(path, ids, n_record):
    rows = [
        {"image_id": i, "collection_id": i, "number_of_subjects": n_record, "status": "included"} for i in ids
    ]
    pd.DataFrame(rows).to_csv(path, sep="\t", index=False)


def test_weighted_stouffer_uses_the_resolved_n_from_qc_json(tmp_path):
    """Record n = 0 (NIDM maps), conversion.n_images gives 20 and 5: weights sqrt(20), sqrt(5)."""
    from nvmeta.images.zmap import make_zmap

    mask_img = _mask()
    m = np.asarray(mask_img.dataobj) > 0
    rng = np.random.default_rng(0)
    ts = {}
    for image_id in (11, 12):
        d = tmp_path / "images" / str(image_id)
        d.mkdir(parents=True)
        rec = {"id": image_id, "collection_id": 1, "map_type": "T map", "number_of_subjects": 0,
               "statistic_parameters": None, "nvmeta": {"status": "ok"}}  # fmt: skip
        (d / "metadata.json").write_text(json.dumps(rec))
        t = np.zeros(SHAPE, np.float32)
        t[m] = rng.normal(size=int(m.sum())) + 3.0
        ts[image_id] = t
        nib.save(nib.Nifti1Image(t, AFFINE), d / "map.nii.gz")
        conversion = {"df": "n-1", "n_images": {"11": 20, "12": 5}}
        qc = make_zmap(
            d / "metadata.json",
            d / "map.nii.gz",
            mask_img,
            {**defaults("conversion"), **conversion},
            d / "zmap.nii.gz",
            d / "qc.json",
            defaults("qc"),
        )
        assert qc["status"] == "included" and qc["n"] == {11: 20, 12: 5}[image_id]
    _write_qc(tmp_path / "qc.tsv", [11, 12], 0)  # the record's n = 0 is what qc.tsv carries
    out = tmp_path / "out"
    summary = run_method(
        "weighted_stouffer", tmp_path / "qc.tsv", lambda i: tmp_path / "images" / str(i) / "zmap.nii.gz",
        mask_img, {"cut_coords": [0]}, out,
    )  # fmt: skip
    z = np.asarray(nib.load(out / "z.nii.gz").dataobj, np.float64)[m]
    assert np.isfinite(z).all(), "all-NaN map: the weights read the record's n = 0"
    z1 = np.asarray(nib.load(tmp_path / "images/11/zmap.nii.gz").dataobj, np.float64)[m]
    z2 = np.asarray(nib.load(tmp_path / "images/12/zmap.nii.gz").dataobj, np.float64)[m]
    np.testing.assert_allclose(z, (math.sqrt(20) * z1 + math.sqrt(5) * z2) / math.sqrt(25), rtol=1e-6)
    assert summary["k_maps"] == 2 and not any("without a sample size" in w for w in summary["warnings"])


def _study(tmp_path, zvals, n=20):
    mask_img = _mask()
    m = np.asarray(mask_img.dataobj) > 0
    for i, z in enumerate(zvals):
        d = tmp_path / "images" / str(i + 1)
        d.mkdir(parents=True, exist_ok=True)
        vol = np.full(SHAPE, np.nan, np.float32)
        vol[m] = z
        nib.save(nib.Nifti1Image(vol, AFFINE), d / "zmap.nii.gz")
        (d / "qc.json").write_text(json.dumps({"n": n}))
    _write_qc(tmp_path / "qc.tsv", list(range(1, len(zvals) + 1)), n)
    return mask_img, m, (lambda i: tmp_path / "images" / str(i) / "zmap.nii.gz")


def test_permutation_records_the_rule_threads_and_does_not_depend_on_them(tmp_path, monkeypatch):
    """The job's threads are BLAS threads (threadpoolctl sees the limit during the fit) and are
    recorded; the sign flips are nilearn's ``n_jobs=1`` ones whatever the threads, so 1 and 2
    threads give the same p_fwe (with ``permuted_ols(n_jobs=2)`` they did not: its seeds are per job)."""
    import threadpoolctl

    from nvmeta.meta import permutation

    rng = np.random.default_rng(1)
    mask_img, m, path_for = _study(
        tmp_path, [rng.normal(size=int(_mask().dataobj[:].sum())) + 0.3 for _ in range(6)]
    )
    seen = []
    real = permutation.Permutation._permute

    def spy(self, source):
        seen.append([i["num_threads"] for i in threadpoolctl.threadpool_info() if i["user_api"] == "blas"])
        return real(self, source)

    monkeypatch.setattr(permutation.Permutation, "_permute", spy)
    p_fwe = {}
    for n_jobs in (1, 2):
        out = tmp_path / f"out{n_jobs}"
        summary = run_method("permutation", tmp_path / "qc.tsv", path_for, mask_img,
                             {"n_perm": 40, "cut_coords": [0]}, out, n_jobs=n_jobs)  # fmt: skip
        assert json.loads((out / "summary.json").read_text())["n_jobs"] == n_jobs == summary["n_jobs"]
        p_fwe[n_jobs] = np.asarray(nib.load(out / "p_fwe.nii.gz").dataobj)
    assert seen[0] and all(t == 1 for t in seen[0]) and all(t == 2 for t in seen[1])
    np.testing.assert_array_equal(p_fwe[1], p_fwe[2])
    assert np.nanmin(p_fwe[1]) < 1


def test_scripts_take_per_image_paths_from_the_rule_inputs():
    """scripts/meta.py maps snakemake.input's per-image lists by their directory (no parents[2])."""
    from pathlib import Path

    from nvmeta.meta.units import paths_by_image
    from nvmeta.testing.workdir import REPO

    src = (REPO / "scripts" / "meta.py").read_text()
    assert "parents[" not in src and "paths_by_image(snakemake.input.zmaps)" in src
    assert "paths_by_image(snakemake.input.qcs)" in src and "n_jobs=snakemake.threads" in src
    got = paths_by_image(["results/images/7/zmap.nii.gz", "elsewhere/images/12/zmap.nii.gz"])
    assert got == {7: Path("results/images/7/zmap.nii.gz"), 12: Path("elsewhere/images/12/zmap.nii.gz")}


def test_p_maps_keep_their_smallest_values(tmp_path):
    """21 maps of z = 3.8: Stouffer z = 17.41, p ~ 7e-68, stored non-zero (float32 read it as 0)."""
    n_vox = int(np.asarray(_mask().dataobj).sum())
    zvals = [np.full(n_vox, 3.8) + np.linspace(-0.2, 0.2, n_vox) for _ in range(21)]
    mask_img, m, path_for = _study(tmp_path, zvals)
    out = tmp_path / "out"
    run_method("stouffer", tmp_path / "qc.tsv", path_for, mask_img, {"cut_coords": [0]}, out)
    p_img = nib.load(out / "p.nii.gz")
    assert p_img.get_data_dtype() == np.float64
    p = np.asarray(p_img.dataobj, np.float64)[m]
    z_ref = np.sum([z.astype(np.float32).astype(np.float64) for z in zvals], axis=0) / math.sqrt(21)
    p_ref = 2 * stats.norm.sf(z_ref)
    assert p_ref.min() < 1e-68 and (p > 0).all()
    np.testing.assert_allclose(p, p_ref, rtol=1e-9)
    logp = np.asarray(nib.load(out / "logp.nii.gz").dataobj, np.float64)[m]
    np.testing.assert_allclose(logp, -np.log10(p_ref), rtol=1e-6)


def test_logp_is_finite_beyond_float64(tmp_path):
    """Fisher on 40 maps of z = 9: p ~ 1e-600 underflows float64; logp keeps it (-log10 p ~ 600)."""
    n_vox = int(np.asarray(_mask().dataobj).sum())
    mask_img, m, path_for = _study(tmp_path, [np.full(n_vox, 9.0)] * 40)
    out = tmp_path / "out"
    run_method("fisher", tmp_path / "qc.tsv", path_for, mask_img, {"cut_coords": [0]}, out)
    logp = np.asarray(nib.load(out / "logp.nii.gz").dataobj, np.float64)[m]
    from nvmeta.meta import log_chi2_sf_even

    x = -2.0 * 40 * special.log_ndtr(-9.0)
    ref = -(math.log(2.0) + float(log_chi2_sf_even(np.array([x]), np.array([40]))[0])) / math.log(10.0)
    assert ref > 400
    np.testing.assert_allclose(logp, ref, rtol=1e-6)


@pytest.mark.parametrize("method", ["stouffer", "dersimonian_laird"])
def test_meta_job_sweeps_stale_temporaries(tmp_path, method):
    from nvmeta.images.effectsize import one_sample

    n_vox = int(np.asarray(_mask().dataobj).sum())
    rng = np.random.default_rng(2)
    mask_img, m, path_for = _study(tmp_path, [rng.normal(size=n_vox) + 2 for _ in range(4)])
    for i in range(1, 5):  # effect maps for the effect-size method
        z = np.asarray(nib.load(path_for(i)).dataobj, np.float64)
        _, g, v = one_sample(z, 20)
        nib.save(nib.Nifti1Image(g.astype(np.float32), AFFINE), path_for(i).with_name("g.nii.gz"))
        nib.save(nib.Nifti1Image(v.astype(np.float32), AFFINE), path_for(i).with_name("varg.nii.gz"))
    out = tmp_path / "out"
    out.mkdir()
    stale = [out / ".z.nii.gz.k3j_x9q2.part.nii.gz", out / ".clusters.tsv.abcdefgh.part.tsv",
             out / ".est.nii.gz.a1b2c3d4.part.stack"]  # fmt: skip
    for p in stale:
        p.write_bytes(b"partial")
    keep = out / "notes.txt"
    keep.write_text("mine")
    run_method(method, tmp_path / "qc.tsv", path_for, mask_img, {"cut_coords": [0]}, out)
    assert not any(p.exists() for p in stale)
    assert keep.read_text() == "mine"
    assert not list(out.glob(".*part*"))  # and the job left none of its own
