"""File verification and conversion: md5, full gzip decompression, NIfTI header and data size,
Analyze pairs converted with nibabel."""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import os
import zlib
from pathlib import Path
from typing import Any

from nvmeta.neurovault.errors import CorruptFile, TooLarge


def _finite_or_text(text: str) -> float | str:
    value = float(text)
    return value if math.isfinite(value) else text


def loads_record(text: str | bytes) -> Any:
    """Parse a JSON reply or record as NeuroVault sends it.

    ``NaN``/``Infinity`` are not JSON: they are read as null (NeuroVault itself sends null). A number
    too large for a float (``1e400``) is kept as the text it was written as, so that the per-image
    stage names it ("'1e400' is not finite") instead of an ``inf`` that no JSON output can hold.
    """
    return json.loads(text, parse_constant=lambda _c: None, parse_float=_finite_or_text)


#: a compressed map may decompress to at most this many times ``max_file_bytes``
MAX_DECOMPRESSION_RATIO = 16

__all__ = [
    "MAX_DECOMPRESSION_RATIO",
    "loads_record",
    "check_gzip",
    "check_nifti",
    "convert_analyze",
    "file_md5",
    "md5_files",
    "sniff",
]


def md5_files(*paths: Path) -> str:
    """md5 hex digest of files read one after the other (an Analyze pair: .hdr then .img)."""
    h = hashlib.md5()
    for p in paths:
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def file_md5(path: str | os.PathLike) -> str:
    """md5 hex digest of a file."""
    return md5_files(Path(path))


def sniff(path: Path, what: str) -> bytes:
    """First bytes of a file; CorruptFile when it is empty or an HTML page."""
    with open(path, "rb") as f:
        head = f.read(512)
    if not head:
        raise CorruptFile(f"empty {what}")
    if head.lstrip()[:1] == b"<" or b"<html" in head.lower():
        raise CorruptFile(f"server returned HTML instead of a {what}")
    return head


def check_gzip(path: Path, max_bytes: int | None = None) -> int:
    """Decompress a whole gzip file (CRC and length checked); return the decompressed size.

    Raises
    ------
    CorruptFile
        Not gzip, truncated or corrupt. TooLarge when it decompresses to more than ``max_bytes``.
    """
    head = sniff(path, "NIfTI file")
    if head[:2] != b"\x1f\x8b":
        raise CorruptFile("not a gzip file (bad magic bytes)")
    n = 0
    try:
        with gzip.open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                n += len(chunk)
                if max_bytes is not None and n > max_bytes:
                    raise TooLarge(f"file decompresses to more than {max_bytes} bytes")
    except (EOFError, gzip.BadGzipFile, zlib.error, OSError) as e:
        raise CorruptFile(f"corrupt gzip ({type(e).__name__}: {str(e)[:80]})") from None
    return n


def check_nifti(path: Path, raw_size: int | None = None) -> Any:
    """Load a NIfTI/Analyze header with nibabel and check the data fits in the file.

    Parameters
    ----------
    path : Path
        ``.nii``, ``.nii.gz`` or ``.hdr`` (with its ``.img``).
    raw_size : int, optional
        Uncompressed size of a single-file NIfTI, to check ``vox_offset + data`` fits.

    Returns
    -------
    nibabel image (data not loaded)
    """
    import nibabel as nib  # lazy: keep per-image imports lean
    import numpy as np

    try:
        img = nib.load(str(path))
        shape = tuple(int(s) for s in img.shape)
        itemsize = np.dtype(img.get_data_dtype()).itemsize
    except Exception as e:  # nibabel raises many types for garbage
        detail = str(e).replace(str(path), "file").replace(Path(path).name, "file")
        raise CorruptFile(f"not a NIfTI image ({type(e).__name__}: {detail[:80]})") from None
    if not shape or min(shape) <= 0:
        raise CorruptFile(f"not a NIfTI image (shape {shape})")
    if raw_size is not None and isinstance(img, nib.Nifti1Image | nib.Nifti2Image):
        need = int(img.header.get("vox_offset", 0)) + int(np.prod(shape)) * itemsize
        if raw_size < need:
            raise CorruptFile(f"NIfTI data shorter than its header declares ({raw_size} < {need} bytes)")
    return img


def convert_analyze(hdr: Path, out: Path) -> None:
    """Analyze/NIfTI pair (.hdr + .img) -> single-file .nii.gz with nibabel (scaling applied)."""
    import nibabel as nib

    img = check_nifti(hdr)
    nii = nib.Nifti1Image.from_image(img)
    nib.save(nii, str(out))
