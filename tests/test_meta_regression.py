"""The estimator registry left the existing methods' outputs unchanged.

``EXPECTED`` holds digests of every output array and table of the five z methods, computed on a
fixed synthetic study (partial coverage, two collections, varied n, a negative and a null region)
with the code before the split (commit 6d83cfc, ``nvmeta/meta.py``), by running
``python tests/test_meta_regression.py`` there. The test recomputes them with today's code.
Cluster tables are compared on their original columns except the (renumbered) cluster id.
``p.nii.gz`` is float64: it is compared after the same float32 cast the old
file had, so the values are unchanged where float32 could hold them.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

AFFINE = np.array([[3.0, 0, 0, -24], [0, 3.0, 0, -30], [0, 0, 3.0, -18], [0, 0, 0, 1]])
OLD_CLUSTER_COLUMNS = ["X", "Y", "Z", "Peak Stat", "Cluster Size (mm3)", "Cluster Size (voxels)"]
METHODS = ["stouffer", "weighted_stouffer", "fisher", "ttest", "permutation"]
CASES = [(m, cw, ts) for m in METHODS for cw in ("none", "collection") for ts in (True, False)]


def build(root: Path):
    """Write the fixed synthetic study: z-maps + qc.json (n) per image and qc.tsv."""
    rng = np.random.default_rng(20261201)
    shape = (14, 16, 12)
    mask = np.zeros(shape, np.uint8)
    mask[1:-1, 1:-1, 1:-1] = 1
    mask_img = nib.Nifti1Image(mask, AFFINE)
    m = mask > 0
    ijk = np.indices(shape)
    blob = np.exp(-(((ijk - np.array([4, 5, 5])[:, None, None, None]) ** 2).sum(0)) / 4.0)
    neg = np.exp(-(((ijk - np.array([10, 11, 6])[:, None, None, None]) ** 2).sum(0)) / 3.0)
    rows = []
    for i in range(9):
        z = rng.normal(size=shape) + 4.0 * blob - 3.0 * neg
        if i % 3 == 1:
            z[:, :, 9:] = np.nan  # partial coverage
        z = np.where(m, z, np.nan).astype(np.float32)
        d = root / "maps" / str(100 + i)
        d.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(z, AFFINE), d / "zmap.nii.gz")
        n = int(10 + 5 * i)
        (d / "qc.json").write_text(json.dumps({"image_id": 100 + i, "n": n}))
        rows.append(
            {"image_id": 100 + i, "collection_id": 7 + (i % 2), "number_of_subjects": n, "status": "included"}
        )
    pd.DataFrame(rows).to_csv(root / "qc.tsv", sep="\t", index=False)
    return mask_img, (lambda i: root / "maps" / str(i) / "zmap.nii.gz")


def digest(out: Path) -> dict:
    d = {}
    for f in sorted(out.iterdir()):
        if f.name.endswith(".nii.gz"):
            arr = np.asarray(nib.load(f).dataobj)
            if f.name == "p.nii.gz":
                arr = arr.astype(np.float32)
            d[f.name] = hashlib.sha256(arr.tobytes()).hexdigest()[:20] + ":" + str(arr.dtype)
        elif f.suffix == ".tsv":
            # the columns the older tables had (later versions renumbered clusters without gaps and
            # added the cluster-forming threshold and connectivity columns)
            t = pd.read_csv(f, sep="\t", dtype=str, keep_default_na=False)
            t = t[[c for c in OLD_CLUSTER_COLUMNS if c in t.columns]]
            d[f.name] = hashlib.sha256(t.to_csv(sep="\t", index=False).encode()).hexdigest()[:20]
        elif f.name == "summary.json":
            s = json.loads(f.read_text())
            for k in (
                "seconds",
                "seconds_estimation",
                "n_jobs",
                "cluster_threshold_z",
                "cluster_connectivity",
                "jackknife",
                "plausibility",
            ):
                s.pop(k, None)
            # the plausibility check's warning is new too (nvmeta.meta.plausibility)
            s["warnings"] = [w for w in s.get("warnings", []) if "what k maps each as strong" not in w]
            d[f.name] = hashlib.sha256(json.dumps(s, sort_keys=True).encode()).hexdigest()[:20]
    return d


#: Outputs of ``permutation`` derived from its parametric z. Since the sign flips are computed as
#: matrix products (session 5) that z is the ttest estimator's (float64 Welford sums) instead of
#: ``t_to_z`` of nilearn's float32 t, so these differ from the old digests in the last float32
#: digits (and summary.json in its new keys); the test checks them against ``ttest`` instead.
PERMUTATION_PARAMETRIC = {
    "z.nii.gz", "p.nii.gz", "q.nii.gz", "z_fdr.nii.gz", "z_bonf.nii.gz", "z_fwe.nii.gz",
    "clusters.tsv", "clusters_bonf.tsv", "summary.json",
}  # fmt: skip


def run_case(root: Path, method: str, cw: str, ts: bool) -> dict:
    from nvmeta.meta import run_method

    mask_img, path_for = build(root)
    cfg = {"combine_within": cw, "two_sided": ts, "n_perm": 50, "cut_coords": [0, 6], "threshold": 2.0}
    out = root / "out"
    run_method(method, root / "qc.tsv", path_for, mask_img, cfg, out)
    return digest(out)


EXPECTED: dict[str, dict[str, str]] = {
    "fisher/collection/False": {
        "clusters.tsv": "32789c6df9fdaf8bebc2",
        "clusters_bonf.tsv": "036f05261174e800d0b4",
        "k.nii.gz": "7a947fe265e5050a3d9c:int16",
        "p.nii.gz": "a9909c646c2c22a91280:float32",
        "q.nii.gz": "6e24146d21977fd82907:float32",
        "summary.json": "9abaebdea5a4126fefdb",
        "z.nii.gz": "e550348eec55ed006cc6:float32",
        "z_bonf.nii.gz": "8d0ac650f00082ad383c:float32",
        "z_fdr.nii.gz": "38d81426dcc503b3a9fd:float32",
    },
    "fisher/collection/True": {
        "clusters.tsv": "3f11cd96750b534117d5",
        "clusters_bonf.tsv": "54e9aecb2159d47bb109",
        "k.nii.gz": "7a947fe265e5050a3d9c:int16",
        "p.nii.gz": "b900c8fe09568df628fa:float32",
        "q.nii.gz": "daddc03f2820aedf2e8f:float32",
        "summary.json": "b453b3779c2312bd1572",
        "z.nii.gz": "1250505ef4fde05b05b4:float32",
        "z_bonf.nii.gz": "a04ba8b7cd5d957b1dde:float32",
        "z_fdr.nii.gz": "3317af1ff54d675a3bab:float32",
    },
    "fisher/none/False": {
        "clusters.tsv": "598cd4a6628b2e205d7e",
        "clusters_bonf.tsv": "d09f03306bbd44993248",
        "k.nii.gz": "41f50c2709b6cf41c4b5:int16",
        "p.nii.gz": "4eb8cd49a9f84e33ca6d:float32",
        "q.nii.gz": "da538143f5af0510793a:float32",
        "summary.json": "37f740c2b5ab4268b7da",
        "z.nii.gz": "63d049ca834ce2ee4d18:float32",
        "z_bonf.nii.gz": "b812a434d5221ec8b645:float32",
        "z_fdr.nii.gz": "e0fd13272cde07068f0d:float32",
    },
    "fisher/none/True": {
        "clusters.tsv": "a81d4594cc77eec2487c",
        "clusters_bonf.tsv": "7e49358c438300ce8783",
        "k.nii.gz": "41f50c2709b6cf41c4b5:int16",
        "p.nii.gz": "1a980841180e19cd21cc:float32",
        "q.nii.gz": "fc85a2e1f34e0e3c1a00:float32",
        "summary.json": "7e14d18e5abb1f5bf49f",
        "z.nii.gz": "398f4810c105d1f3b5c3:float32",
        "z_bonf.nii.gz": "040206dd8b1ef554c969:float32",
        "z_fdr.nii.gz": "bbf1081dce4105c41a8d:float32",
    },
    "permutation/collection/False": {
        "clusters.tsv": "e71a93f90e7a6b205468",
        "clusters_bonf.tsv": "e71a93f90e7a6b205468",
        "clusters_fwe.tsv": "e71a93f90e7a6b205468",
        "k.nii.gz": "7a947fe265e5050a3d9c:int16",
        "p.nii.gz": "1dfbeccfc0d8247cd589:float32",
        "p_fwe.nii.gz": "1021829ca8cb7e4dedf1:float32",
        "q.nii.gz": "2b5d5fd27ff739976a6d:float32",
        "summary.json": "d49de481badb4bb35638",
        "z.nii.gz": "d7a95b0c6de8a426fb4a:float32",
        "z_bonf.nii.gz": "35567e5a1dda946ef7b7:float32",
        "z_fdr.nii.gz": "35567e5a1dda946ef7b7:float32",
        "z_fwe.nii.gz": "35567e5a1dda946ef7b7:float32",
    },
    "permutation/collection/True": {
        "clusters.tsv": "e71a93f90e7a6b205468",
        "clusters_bonf.tsv": "e71a93f90e7a6b205468",
        "clusters_fwe.tsv": "e71a93f90e7a6b205468",
        "k.nii.gz": "7a947fe265e5050a3d9c:int16",
        "p.nii.gz": "5a2cfae78919f61d8651:float32",
        "p_fwe.nii.gz": "3e2daba67fef75f17400:float32",
        "q.nii.gz": "279470ef55deb944e421:float32",
        "summary.json": "3bfdc4fe939945759a7a",
        "z.nii.gz": "d7a95b0c6de8a426fb4a:float32",
        "z_bonf.nii.gz": "35567e5a1dda946ef7b7:float32",
        "z_fdr.nii.gz": "35567e5a1dda946ef7b7:float32",
        "z_fwe.nii.gz": "35567e5a1dda946ef7b7:float32",
    },
    "permutation/none/False": {
        "clusters.tsv": "206206131de9a4fdfd2b",
        "clusters_bonf.tsv": "66abb1ecc864a3c3ee94",
        "clusters_fwe.tsv": "e71a93f90e7a6b205468",
        "k.nii.gz": "41f50c2709b6cf41c4b5:int16",
        "p.nii.gz": "e90324976a1aad9e7442:float32",
        "p_fwe.nii.gz": "7ccbc9e05e4d601c2feb:float32",
        "q.nii.gz": "77db859b2f8d81892084:float32",
        "summary.json": "8f775db6617f2c395653",
        "z.nii.gz": "2af196493847017988f7:float32",
        "z_bonf.nii.gz": "9183bf7b46cb95341506:float32",
        "z_fdr.nii.gz": "f6782072604e00038e27:float32",
        "z_fwe.nii.gz": "29c35f32df5a7253f111:float32",
    },
    "permutation/none/True": {
        "clusters.tsv": "310d5cb0b2827c06e1d9",
        "clusters_bonf.tsv": "60915f5d42318dbf124b",
        "clusters_fwe.tsv": "e71a93f90e7a6b205468",
        "k.nii.gz": "41f50c2709b6cf41c4b5:int16",
        "p.nii.gz": "0798d8dc02bc8205e635:float32",
        "p_fwe.nii.gz": "c618ebc84d4088caf496:float32",
        "q.nii.gz": "8f217f533be1bbadeb54:float32",
        "summary.json": "8860d4b4dc2d3d0671d4",
        "z.nii.gz": "2af196493847017988f7:float32",
        "z_bonf.nii.gz": "779e36de0d2b4e6740a3:float32",
        "z_fdr.nii.gz": "dd916816702a9b27180c:float32",
        "z_fwe.nii.gz": "cd990dbae612127032d0:float32",
    },
    "stouffer/collection/False": {
        "clusters.tsv": "f1c4fb800628ba8832c1",
        "clusters_bonf.tsv": "c0a7527f3b7c9f275bdf",
        "k.nii.gz": "7a947fe265e5050a3d9c:int16",
        "p.nii.gz": "f1c780b833d183225ac4:float32",
        "q.nii.gz": "030d87bc64500eea2a7d:float32",
        "summary.json": "baceb1eb84ba055cdfd9",
        "z.nii.gz": "d6f27ea54eaf14a5449d:float32",
        "z_bonf.nii.gz": "a0518d6aa2b8d736ad73:float32",
        "z_fdr.nii.gz": "cad3533c7664b28f7648:float32",
    },
    "stouffer/collection/True": {
        "clusters.tsv": "9f76856135270bcef2c8",
        "clusters_bonf.tsv": "c82fe37cee72f2031b31",
        "k.nii.gz": "7a947fe265e5050a3d9c:int16",
        "p.nii.gz": "778477d191d48ee469b7:float32",
        "q.nii.gz": "aa8a071c78fac961640e:float32",
        "summary.json": "20246757b4e92cae1b5f",
        "z.nii.gz": "d6f27ea54eaf14a5449d:float32",
        "z_bonf.nii.gz": "a9d0461c13e99a3e5363:float32",
        "z_fdr.nii.gz": "bb4550a73c7323696f61:float32",
    },
    "stouffer/none/False": {
        "clusters.tsv": "1511aba542f79dd11ff6",
        "clusters_bonf.tsv": "a00fa7fe00a220e40b5c",
        "k.nii.gz": "41f50c2709b6cf41c4b5:int16",
        "p.nii.gz": "87f01523e29f35632611:float32",
        "q.nii.gz": "0cf9d6229299ecb3d905:float32",
        "summary.json": "edd10183aee13d657d7d",
        "z.nii.gz": "4f8e02ad34c95b50fd11:float32",
        "z_bonf.nii.gz": "e43939915451dc913f38:float32",
        "z_fdr.nii.gz": "de24e153a07507fba3fb:float32",
    },
    "stouffer/none/True": {
        "clusters.tsv": "2a184408fb439466d4d6",
        "clusters_bonf.tsv": "927b2526b7bf61b1dd60",
        "k.nii.gz": "41f50c2709b6cf41c4b5:int16",
        "p.nii.gz": "0555843f8c9514de0e3c:float32",
        "q.nii.gz": "02c296cb41a30657f3a8:float32",
        "summary.json": "b4c3abfe760a2609b00d",
        "z.nii.gz": "4f8e02ad34c95b50fd11:float32",
        "z_bonf.nii.gz": "2517447f23c46009a942:float32",
        "z_fdr.nii.gz": "98b6a091c63b2cc31001:float32",
    },
    "ttest/collection/False": {
        "clusters.tsv": "e71a93f90e7a6b205468",
        "clusters_bonf.tsv": "e71a93f90e7a6b205468",
        "k.nii.gz": "7a947fe265e5050a3d9c:int16",
        "p.nii.gz": "da22462d40610a76767a:float32",
        "q.nii.gz": "31cdda032f9b4ec8e37d:float32",
        "summary.json": "fcf6c1bb5c26dcdaa2f2",
        "z.nii.gz": "b863dc7f604ed59f4164:float32",
        "z_bonf.nii.gz": "35567e5a1dda946ef7b7:float32",
        "z_fdr.nii.gz": "35567e5a1dda946ef7b7:float32",
    },
    "ttest/collection/True": {
        "clusters.tsv": "e71a93f90e7a6b205468",
        "clusters_bonf.tsv": "e71a93f90e7a6b205468",
        "k.nii.gz": "7a947fe265e5050a3d9c:int16",
        "p.nii.gz": "86178a3fcda15cd9b569:float32",
        "q.nii.gz": "0c73b5e72aae74922890:float32",
        "summary.json": "db3665b0548690ae076d",
        "z.nii.gz": "b863dc7f604ed59f4164:float32",
        "z_bonf.nii.gz": "35567e5a1dda946ef7b7:float32",
        "z_fdr.nii.gz": "35567e5a1dda946ef7b7:float32",
    },
    "ttest/none/False": {
        "clusters.tsv": "f734d6ae903df028ed21",
        "clusters_bonf.tsv": "80f5e5aba536406ffe3d",
        "k.nii.gz": "41f50c2709b6cf41c4b5:int16",
        "p.nii.gz": "f4441ef25f8071c7c050:float32",
        "q.nii.gz": "8b036594254afb0b5b03:float32",
        "summary.json": "77d0605aed05466f7ac9",
        "z.nii.gz": "d4d309cff5e1daaaeaaf:float32",
        "z_bonf.nii.gz": "797347425b17747555a0:float32",
        "z_fdr.nii.gz": "c242b5d648510d6a6c80:float32",
    },
    "ttest/none/True": {
        "clusters.tsv": "89998321e2033d51d432",
        "clusters_bonf.tsv": "e71a93f90e7a6b205468",
        "k.nii.gz": "41f50c2709b6cf41c4b5:int16",
        "p.nii.gz": "8c2f9c891184f33f5a74:float32",
        "q.nii.gz": "7d70944ccd04470aba86:float32",
        "summary.json": "3b9c328d4d6b695823d2",
        "z.nii.gz": "d4d309cff5e1daaaeaaf:float32",
        "z_bonf.nii.gz": "d340909b8a3c830c6e66:float32",
        "z_fdr.nii.gz": "3a683e8e2ae3f9ffa2e4:float32",
    },
    "weighted_stouffer/collection/False": {
        "clusters.tsv": "f1c4fb800628ba8832c1",
        "clusters_bonf.tsv": "c0a7527f3b7c9f275bdf",
        "k.nii.gz": "7a947fe265e5050a3d9c:int16",
        "p.nii.gz": "f1c780b833d183225ac4:float32",
        "q.nii.gz": "030d87bc64500eea2a7d:float32",
        "summary.json": "9642345d5861084a38b0",
        "z.nii.gz": "d6f27ea54eaf14a5449d:float32",
        "z_bonf.nii.gz": "a0518d6aa2b8d736ad73:float32",
        "z_fdr.nii.gz": "cad3533c7664b28f7648:float32",
    },
    "weighted_stouffer/collection/True": {
        "clusters.tsv": "9f76856135270bcef2c8",
        "clusters_bonf.tsv": "c82fe37cee72f2031b31",
        "k.nii.gz": "7a947fe265e5050a3d9c:int16",
        "p.nii.gz": "778477d191d48ee469b7:float32",
        "q.nii.gz": "aa8a071c78fac961640e:float32",
        "summary.json": "0e176d6420249ecc7a1a",
        "z.nii.gz": "d6f27ea54eaf14a5449d:float32",
        "z_bonf.nii.gz": "a9d0461c13e99a3e5363:float32",
        "z_fdr.nii.gz": "bb4550a73c7323696f61:float32",
    },
    "weighted_stouffer/none/False": {
        "clusters.tsv": "d06b67d64c37d64422ac",
        "clusters_bonf.tsv": "0c69368343d14db8e8b1",
        "k.nii.gz": "41f50c2709b6cf41c4b5:int16",
        "p.nii.gz": "7ec941dd192c9ef205af:float32",
        "q.nii.gz": "15b9921b02eed799ee16:float32",
        "summary.json": "2b9852a158717c33f7f9",
        "z.nii.gz": "2cbde0d4932ce9857f54:float32",
        "z_bonf.nii.gz": "6fd26a31511e19335b4b:float32",
        "z_fdr.nii.gz": "fe9a0b3b2e0f45f75721:float32",
    },
    "weighted_stouffer/none/True": {
        "clusters.tsv": "18e44701717a0f6ff46b",
        "clusters_bonf.tsv": "397ae4db8ac01da1fbd7",
        "k.nii.gz": "41f50c2709b6cf41c4b5:int16",
        "p.nii.gz": "de2f9a75f035a8308553:float32",
        "q.nii.gz": "7885e371f0f00bef7d99:float32",
        "summary.json": "6c9b58f54a401beb57b3",
        "z.nii.gz": "2cbde0d4932ce9857f54:float32",
        "z_bonf.nii.gz": "622317a8fa07bb5a2470:float32",
        "z_fdr.nii.gz": "811b13876c5b05451f64:float32",
    },
}


@pytest.mark.parametrize(("method", "cw", "ts"), CASES)
def test_outputs_unchanged_by_registry_split(tmp_path, method, cw, ts):
    expected = EXPECTED[f"{method}/{cw}/{ts}"]
    got = run_case(tmp_path, method, cw, ts)
    # new outputs (logp.nii.gz) may be added; every old one must be identical
    for name, value in expected.items():
        if name == "z.png" or (method == "permutation" and name in PERMUTATION_PARAMETRIC):
            continue
        assert got.get(name) == value, f"{method}/{cw}/two_sided={ts}: {name} changed"
    assert set(expected) <= set(got)
    if method == "permutation":
        # the permutation test itself is unchanged (p_fwe, k, clusters_fwe above); its parametric z
        # is the ttest estimator's on the complete voxels
        out = tmp_path / "out"
        z = np.asarray(nib.load(out / "z.nii.gz").dataobj, dtype=np.float64)
        run_case(tmp_path / "ttest", "ttest", cw, ts)
        zt = np.asarray(nib.load(tmp_path / "ttest" / "out" / "z.nii.gz").dataobj, dtype=np.float64)
        full = np.isfinite(np.asarray(nib.load(out / "p_fwe.nii.gz").dataobj))
        assert full.sum() > 100 and np.all(np.isnan(z[~full]) | (z[~full] == 0))
        np.testing.assert_array_equal(z[full], zt[full])
        for name in ("p.nii.gz", "logp.nii.gz"):  # and so are its p-values
            a = np.asarray(nib.load(out / name).dataobj, dtype=np.float64)[full]
            b = np.asarray(nib.load(tmp_path / "ttest" / "out" / name).dataobj, dtype=np.float64)[full]
            np.testing.assert_array_equal(a, b)


if __name__ == "__main__":  # regenerate with the code of a given checkout (see the docstring)
    import tempfile

    res = {}
    for method, cw, ts in CASES:
        with tempfile.TemporaryDirectory() as tmp:
            try:
                res[f"{method}/{cw}/{ts}"] = run_case(Path(tmp), method, cw, ts)
            except Exception as exc:  # noqa: BLE001
                res[f"{method}/{cw}/{ts}"] = {"error": str(exc)}
        print(method, cw, ts, file=sys.stderr, flush=True)
    print(json.dumps(res, indent=1, sort_keys=True))
