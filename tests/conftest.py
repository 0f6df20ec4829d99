"""Shared fixtures: a tiny synthetic snapshot (``tiny_snapshot``) and a fixture server over it.

Records are built from the real recorded replies in ``tests/data/api_responses/`` (NeuroVault/pynv
cassettes) so they keep NeuroVault's field layout.
"""

from __future__ import annotations

import gzip
import hashlib
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

DATA = Path(__file__).resolve().parent / "data"
API_RESPONSES = DATA / "api_responses"

PUBLIC_CID, PRIVATE_CID, MANY_CID = 11, 12, 13
N_MANY = 25  # images of collection 13 (pagination tests)


def md5(b: bytes) -> str:
    return hashlib.md5(b).hexdigest()


def nifti_bytes(shape=(4, 5, 6), seed=0, gz=True, dtype="float32") -> bytes:
    """Bytes of a small synthetic NIfTI-1 map (``.nii.gz`` by default, deterministic)."""
    import nibabel as nib
    import numpy as np

    rng = np.random.default_rng(seed)
    data = rng.standard_normal(shape).astype(dtype)
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    aff[:3, 3] = [-4.0, -5.0, -6.0]
    raw = nib.Nifti1Image(data, aff).to_bytes()
    return gzip.compress(raw, mtime=0) if gz else raw


def analyze_pair(tmp: Path, shape=(4, 5, 6), seed=3) -> tuple[bytes, bytes, object]:
    """(.hdr bytes, .img bytes, data array) of an SPM2 Analyze image (no NIfTI magic)."""
    import nibabel as nib
    import numpy as np

    data = np.random.default_rng(seed).standard_normal(shape).astype("float32")
    img = nib.Spm2AnalyzeImage(data, np.diag([2.0, 2.0, 2.0, 1.0]))
    tmp.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(tmp / "a.hdr"))
    return (tmp / "a.hdr").read_bytes(), (tmp / "a.img").read_bytes(), data


def build_tiny_snapshot(root: Path, work: Path) -> SimpleNamespace:
    """Write the tiny snapshot under ``root``; return a description of it.

    Collection 11 (public): 101, 102 (.nii.gz 3-D), 103 (.nii), 104 (Analyze .hdr/.img),
    105 (5 volumes), 106 (truncated gzip), 107 (``file_size`` 0).
    Collection 12 (private): 201. Collection 13: 25 tiny maps, ids 301..325 (pagination).
    Neurosynth words for 101.
    """
    from nvmeta.neurovault.layout import write_snapshot
    from nvmeta.testing import collection_record, image_record, load_recorded

    img_t = load_recorded(API_RESPONSES / "read_image.json")
    col_t = load_recorded(API_RESPONSES / "read_collection.json")
    hdr, img, analyze_data = analyze_pair(work / "analyze")
    full = nifti_bytes(seed=6)
    served = {
        101: nifti_bytes(seed=1),
        102: nifti_bytes(seed=2),
        103: nifti_bytes(seed=3, gz=False),
        104: hdr + img,
        105: nifti_bytes(shape=(4, 5, 6, 5), seed=5),
        106: full[: len(full) // 2],
        107: nifti_bytes(seed=7),
        201: nifti_bytes(seed=8),
    }
    names = {
        101: "zstat1.nii.gz",
        102: "tstat1.nii.gz",
        103: "raw_t.nii",
        104: "spm_T.hdr",
        105: "afni_5vol.nii.gz",
        106: "truncated.nii.gz",
        107: "empty_size.nii.gz",
        201: "secret.nii.gz",
    }
    files: dict[str, bytes] = {}
    records = {}
    for iid, name in names.items():
        cid = PRIVATE_CID if iid == 201 else PUBLIC_CID
        size = len(served[iid]) if iid != 104 else len(hdr)
        records[iid] = image_record(
            img_t,
            iid,
            cid,
            name,
            file_size=0 if iid == 107 else size,
            map_type="T map",
            analysis_level="group",
            number_of_subjects=20,
            name=f"map {iid}",
        )
        if iid == 104:
            files[f"media/images/{cid}/spm_T.hdr"] = hdr
            files[f"media/images/{cid}/spm_T.img"] = img
        else:
            files[f"media/images/{cid}/{name}"] = served[iid]
    for k in range(N_MANY):
        iid = 301 + k
        served[iid] = nifti_bytes(shape=(2, 2, 2), seed=100 + k)
        name = f"s{k:02d}.nii.gz"
        files[f"media/images/{MANY_CID}/{name}"] = served[iid]
        records[iid] = image_record(img_t, iid, MANY_CID, name, file_size=len(served[iid]), map_type="Z map")
    collections = {
        c: collection_record(col_t, c, name=f"collection {c}") for c in (PUBLIC_CID, PRIVATE_CID, MANY_CID)
    }
    collections[MANY_CID]["number_of_images"] = N_MANY  # (the recorded template's collection is empty)
    write_snapshot(
        root,
        list(records.values()),
        list(collections.values()),
        files,
        private=[PRIVATE_CID],
        neurosynth={101: {"data": {"values": {"pain": 0.31, "motor": 0.12}}}},
    )
    return SimpleNamespace(
        root=root,
        records=records,
        collections=collections,
        served=served,
        analyze_data=analyze_data,
        ids={
            "ok": 101,
            "ok2": 102,
            "nii": 103,
            "analyze": 104,
            "volumes5": 105,
            "truncated": 106,
            "size0": 107,
            "private": 201,
            "many": list(range(301, 301 + N_MANY)),
        },
        public_cid=PUBLIC_CID,
        private_cid=PRIVATE_CID,
        many_cid=MANY_CID,
    )


@pytest.fixture(scope="session")
def _tiny_snapshot_template(tmp_path_factory) -> SimpleNamespace:
    base = tmp_path_factory.mktemp("tiny_template")
    return build_tiny_snapshot(base / "snapshot", base / "work")


@pytest.fixture
def tiny_snapshot(tmp_path, _tiny_snapshot_template) -> SimpleNamespace:
    """A tiny snapshot (a fresh copy per test): see :func:`build_tiny_snapshot`.

    Attributes: ``root``, ``records`` (id -> record), ``served`` (id -> served bytes; Analyze: .hdr+.img),
    ``analyze_data``, ``ids`` (role -> id), ``public_cid``, ``private_cid``, ``many_cid``.
    """
    root = tmp_path / "snapshot"
    shutil.copytree(_tiny_snapshot_template.root, root)
    ns = SimpleNamespace(**vars(_tiny_snapshot_template))
    ns.root = root
    return ns


@pytest.fixture
def fixture_server(tiny_snapshot):
    """A running :class:`nvmeta.testing.server.FixtureServer` over ``tiny_snapshot``."""
    from nvmeta.testing.server import FixtureServer

    with FixtureServer(tiny_snapshot.root) as srv:
        srv.tiny = tiny_snapshot
        yield srv


def fast_config(url: str, **kw) -> dict:
    """``config["neurovault"]`` with tiny backoff/timeouts for tests."""
    from nvmeta.workflow.config import defaults

    cfg = {
        **defaults("neurovault"),
        "url": url,
        "mode": "download_new",
        "timeout": 2.0,
        "retries": 3,
        "backoff": 0.001,
        "max_connections": 2,
        "max_file_bytes": 10_000_000,
        "max_json_bytes": 5_000_000,
        "user_agent": "nvmeta-tests",
    }
    cfg.update(kw)
    return cfg


@pytest.fixture
def nv_config():
    """Factory: ``nv_config(url, **overrides)`` -> fast ``config["neurovault"]`` for tests."""
    return fast_config


@pytest.fixture
def client(fixture_server):
    """An HTTP client on the fixture server with fast retries (closed after the test)."""
    from nvmeta.neurovault import make_client

    c = make_client(fast_config(fixture_server.url))
    yield c
    c.close()
