"""The files of a NeuroVault database export: which tables, from which export, and their content digest.

An export (``docs/neurovault-dump.md``) is a ``.tar.gz`` holding one folder of ``statmaps_*.csv``
tables, or that folder unpacked. This module finds the tables of exactly one export (a directory or
archive holding two exports, e.g. ``2022_export/`` and ``2024_export/``, is an error naming them:
mixing their tables would join rows of different days), reads them through a wrapper that hashes
what it reads and bounds the size of one CSV field (``neurovault.max_dump_field_bytes``: a 200 MB
field would otherwise be held several times over by the CSV parser), and computes the export's
content digest, the one the query records (``record_source``) and the query rule's ``params`` carry
so that a changed export reruns the query even when its mtime is older (``cp -p``, ``rsync -a``,
``tar x`` over an unpacked one).

Hashing a large export on every ``snakemake -n`` would cost seconds, so :func:`dump_digest` keeps each
file's sha256 in a small cache keyed on the file's size, mtime, ctime, inode and device: the ctime
changes whenever a file's content or inode is replaced and cannot be set from user space, so a
replaced file is always hashed again.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from nvmeta.neurovault.errors import NeuroVaultError

logger = logging.getLogger(__name__)

__all__ = [
    "DIGEST_CACHE",
    "TABLES",
    "DumpError",
    "dump_digest",
    "dump_digest_or_exit",
    "iter_tables",
    "table_files",
]

#: table -> CSV file name in the export
TABLES = {
    "collection": "statmaps_collection.csv",
    "item": "statmaps_basecollectionitem.csv",
    "image": "statmaps_image.csv",
    "statmap": "statmaps_statisticmap.csv",
    "task": "statmaps_cognitiveatlastask.csv",
    "contrast": "statmaps_cognitiveatlascontrast.csv",
}
_BY_FILE = {f: t for t, f in TABLES.items()}

#: Where :func:`dump_digest_or_exit` caches the sha256 of the export's files (outside results/,
#: so that a dry run never changes results).
DIGEST_CACHE = ".snakemake/nvmeta/dump_sha256.json"

_CHUNK = 1 << 18
_QUOTE, _COMMA, _NEWLINE = 34, 44, 10


class DumpError(NeuroVaultError):
    """The dump cannot be read (missing table or column, not a tar.gz of CSV tables, two exports)."""


class _FieldBound:
    """Tracks the length of the CSV field being read across chunks; raises past ``limit`` bytes.

    A field ends at a comma or newline outside quotes; inside quotes (an odd number of ``"`` so far,
    doubled quotes counting twice) neither ends it. numpy scans each chunk in a few vector passes.
    """

    def __init__(self, limit: int, what: str) -> None:
        self.limit, self.what = limit, what
        self.quoted = False
        self.run = 0  # bytes of the current field so far
        self.offset = 0

    def feed(self, data: bytes | memoryview) -> None:
        import numpy as np

        arr = np.frombuffer(data, dtype=np.uint8)
        if not arr.size:
            return
        ends = np.flatnonzero((arr == _COMMA) | (arr == _NEWLINE))
        quotes = np.flatnonzero(arr == _QUOTE)
        if self.quoted or quotes.size:
            # a separator ends a field when an even number of quotes precede it (this chunk's, plus
            # one when a quoted field runs on from the previous chunk)
            inside = (np.searchsorted(quotes, ends) + self.quoted) % 2 == 1
            ends = ends[~inside]
            self.quoted = (quotes.size + self.quoted) % 2 == 1
        if ends.size:
            longest = max(self.run + int(ends[0]), int(np.diff(ends).max()) - 1 if ends.size > 1 else 0)
            self.run = arr.size - int(ends[-1]) - 1
        else:
            longest = self.run = self.run + arr.size
        longest = max(longest, self.run)
        self.offset += arr.size
        if longest > self.limit:
            raise DumpError(
                f"{self.what}: a field of more than {self.limit} bytes (neurovault.max_dump_field_bytes) "
                f"before byte {self.offset}; nothing was selected. Fix: check that this is an "
                "unmodified NeuroVault export, or raise neurovault.max_dump_field_bytes."
            )


class _TableReader(io.RawIOBase):
    """A table's bytes as read by the CSV parser, hashed and with its fields bounded on the way."""

    def __init__(self, raw: BinaryIO, limit: int, what: str, hashed: bool = True) -> None:
        super().__init__()
        self.raw, self.sha = raw, hashlib.sha256() if hashed else None
        self.bound = _FieldBound(limit, what)

    def readable(self) -> bool:
        return True

    def readinto(self, buf: Any) -> int:
        data = self.raw.read(min(len(buf), _CHUNK))
        n = len(data)
        if n:
            self.bound.feed(data)
            if self.sha is not None:
                self.sha.update(data)
            buf[:n] = data
        return n


class _HashingReader:
    """A read-only file wrapper that hashes what is read (the archive's checksum costs no second pass)."""

    def __init__(self, raw: BinaryIO) -> None:
        self.raw, self.sha = raw, hashlib.sha256()
        self.size = 0

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        self.sha.update(data)
        self.size += len(data)
        return data

    def drain(self) -> None:
        while self.read(1 << 20):
            pass


def _several_exports(path: Path, folders: list[str]) -> DumpError:
    shown = ", ".join(f"{f or '.'}/" for f in sorted(folders))
    return DumpError(
        f"neurovault.dump: {path} holds more than one export (statmaps tables in {shown}); their "
        "tables would be mixed. Fix: point neurovault.dump at one export (its .tar.gz, or the "
        "folder of one unpacked export)."
    )


def table_files(path: str | os.PathLike) -> dict[str, Path]:
    """The table files of the one export in directory ``path`` (table -> file).

    Raises
    ------
    DumpError
        The tables sit in more than one folder (two exports unpacked side by side).
    """
    root = Path(path)
    found: dict[str, dict[str, Path]] = {}
    for fname, table in _BY_FILE.items():
        for file in root.rglob(fname):
            folder = file.parent.relative_to(root).as_posix()
            found.setdefault("" if folder == "." else folder, {})[table] = file
    if len(found) > 1:
        raise _several_exports(root, list(found))
    return next(iter(found.values()), {})


def combined_digest(digests: dict[str, str]) -> str:
    """The digest of a directory export: sha256 over ``"<file name> <sha256>"`` lines, by file name."""
    h = hashlib.sha256()
    for fname in sorted(digests):
        h.update(f"{fname} {digests[fname]}\n".encode())
    return h.hexdigest()


def iter_tables(
    path: Path, limit: int, read: Callable[[str, BinaryIO], Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Read every table of the export at ``path`` with ``read(table, binary_file)``.

    Returns
    -------
    (dict, dict)
        ``{table: read(...)}`` and the export's identity ``{"kind": "dump", "path", "bytes",
        "sha256"}`` (a ``.tar.gz``: its own size and sha256; a directory: the tables' total size and
        :func:`combined_digest`, the digest :func:`dump_digest` computes without reading them).
    """
    tables: dict[str, Any] = {}
    if path.is_dir():
        files = table_files(path)
        digests, size = {}, 0
        for table, file in files.items():
            with open(file, "rb") as raw:
                reader = _TableReader(raw, limit, f"dump table {file}")
                tables[table] = read(table, io.BufferedReader(reader, _CHUNK))
                while reader.readinto(bytearray(_CHUNK)):  # what the parser left unread, for the digest
                    pass
            digests[TABLES[table]] = reader.sha.hexdigest()
            size += file.stat().st_size
        sha = combined_digest(digests)
    elif path.is_file():
        tables, sha, size = _read_archive(path, limit, read)
    else:
        raise DumpError(f"neurovault.dump: no such file or directory: {path}")
    return tables, {"kind": "dump", "path": str(path), "bytes": size, "sha256": sha}


def _read_archive(path: Path, limit: int, read: Callable[[str, BinaryIO], Any]) -> tuple[dict, str, int]:
    tables: dict[str, Any] = {}
    folders: dict[str, set[str]] = {}
    with open(path, "rb") as raw:
        hashing = _HashingReader(raw)
        try:
            with tarfile.open(fileobj=hashing, mode="r|gz") as tar:
                for member in tar:
                    folder, _, base = member.name.rpartition("/")
                    table = _BY_FILE.get(base)
                    if table is None or not member.isfile():
                        continue
                    if table in folders.setdefault(folder, set()):
                        raise DumpError(f"neurovault.dump: {path} holds {member.name} twice")
                    folders[folder].add(table)
                    if len(folders) > 1:  # the rest is only listed, to name every export
                        continue
                    fh = tar.extractfile(member)
                    if fh is not None:
                        # (the archive's own bytes are hashed, not each table's)
                        reader = _TableReader(fh, limit, f"dump table {member.name} in {path}", hashed=False)
                        tables[table] = read(table, io.BufferedReader(reader, _CHUNK))
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise DumpError(f"neurovault.dump: not a readable .tar.gz export ({exc})") from None
        hashing.drain()
    if len(folders) > 1:
        raise _several_exports(path, list(folders))
    return tables, hashing.sha.hexdigest(), hashing.size


# -- the content digest for the query rule's params ------------------------------------------------
def _stat_key(st: os.stat_result) -> list[int]:
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


def _file_sha256(file: Path) -> str:
    h = hashlib.sha256()
    with open(file, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _cached_sha256(files: list[Path], cache_path: Path | None) -> Iterator[tuple[Path, str]]:
    cache: dict[str, Any] = {}
    if cache_path is not None:
        try:
            cache = json.loads(cache_path.read_text())
        except (OSError, ValueError):
            cache = {}
    if not isinstance(cache, dict):
        cache = {}
    changed = False
    for file in files:
        key = _stat_key(file.stat())
        entry = cache.get(str(file))
        if isinstance(entry, dict) and entry.get("stat") == key and isinstance(entry.get("sha256"), str):
            yield file, entry["sha256"]
            continue
        logger.info("hashing %s (%d bytes) to know whether the dump changed", file, key[0])
        sha = _file_sha256(file)
        cache[str(file)] = {"stat": key, "sha256": sha}
        changed = True
        yield file, sha
    if changed and cache_path is not None:
        from nvmeta.io import write_json

        try:
            write_json(cache_path, cache)
        except OSError as exc:  # a read-only working directory: hashed again next time
            logger.warning("could not cache the dump's sha256 in %s (%s)", cache_path, exc)


def dump_digest(path: str | os.PathLike, cache_path: str | os.PathLike | None = None) -> str:
    """The sha256 the query records for the export at ``path`` (``record_source``), without reading it
    when ``cache_path`` already knows its files as they are.

    Parameters
    ----------
    path : path-like
        ``neurovault.dump``: a ``.tar.gz`` (the digest is its sha256) or an unpacked export (the
        :func:`combined_digest` of its tables).
    cache_path : path-like, optional
        JSON cache of per-file sha256 keyed on size, mtime, ctime, inode and device.

    Raises
    ------
    DumpError
        No such file or directory, no table in the directory, or more than one export in it.
    """
    root = Path(path).expanduser().resolve()
    cache = Path(cache_path) if cache_path is not None else None
    if root.is_file():
        return dict(_cached_sha256([root], cache))[root]
    if not root.is_dir():
        raise DumpError(f"neurovault.dump: no such file or directory: {root}")
    files = table_files(root)
    if not files:
        raise DumpError(f"neurovault.dump: no statmaps_*.csv table in {root}")
    digests = dict(_cached_sha256(sorted(files.values()), cache))
    return combined_digest({f.name: digests[f] for f in files.values()})


def dump_digest_or_exit(
    dump: str | os.PathLike | None, cache_path: str | os.PathLike = DIGEST_CACHE
) -> str | None:
    """:func:`dump_digest` for the Snakefile (None without a dump): an unusable dump prints one message
    and exits 1 before any job, as a broken config does."""
    import sys

    if not dump:
        return None
    try:
        return dump_digest(dump, cache_path)
    except (DumpError, OSError) as exc:
        print(
            f"nvmeta: {exc}\nFix: set neurovault.dump to one NeuroVault export (its .tar.gz or its "
            "unpacked folder of statmaps_*.csv tables), or to null to select through the API.\n"
            "Nothing was run.",
            file=sys.stderr,
        )
        raise SystemExit(1) from None
