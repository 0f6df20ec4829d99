"""Atomic file writing helpers: a partial file never appears at an output path."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(dest: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path next to ``dest``; rename it onto ``dest`` on success.

    Parameters
    ----------
    dest : path-like
        Final output path. Its parent directory is created if needed.
    suffix : str, optional
        Suffix of the temporary file (defaults to the suffixes of ``dest``, so that
        libraries that pick a format from the extension, e.g. nibabel, still work).

    Yields
    ------
    pathlib.Path
        Temporary path in the same directory (same filesystem, so the rename is atomic).
        On any exception it is removed and ``dest`` is left untouched.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if suffix is None:
        suffix = "".join(dest.suffixes)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=f".part{suffix}", dir=dest.parent)
    os.close(fd)
    # mkstemp creates 0600 files; give outputs the usual permissions (0666 minus the umask).
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented, key-sorted JSON to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(
            json.dumps(obj, indent=1, sort_keys=True, allow_nan=False, default=_json_default) + "\n"
        )


def _json_default(obj: Any) -> Any:
    # numpy scalars and paths appear in records; convert without importing numpy here.
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def read_json(path: str | os.PathLike) -> Any:
    """Read a JSON file."""
    return json.loads(Path(path).read_text())


def write_tsv(path: str | os.PathLike, df: Any) -> None:
    """Write a pandas DataFrame as a tab-separated file atomically (no index)."""
    with atomic_path(path) as tmp:
        df.to_csv(tmp, sep="\t", index=False, na_rep="")
