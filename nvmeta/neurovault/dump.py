"""The dump source: select from a NeuroVault database export (nv-data) without any API request.

NeuroVault publishes exports of its database (``NeuroVault/nv-data`` on GitHub: a ``.tar.gz`` of one
CSV file per table of the ``statmaps`` application, see ``docs/neurovault-dump.md``). This source
reads such an export (the ``.tar.gz`` itself or its unpacked directory), keeps the public collections
only, and normalises every statistic map to the field names and labels of the REST API's records
(``map_type: T map``, ``analysis_level: group``, ``cognitive_paradigm_cogatlas`` = the task's name,
``file`` = the public media URL, booleans from ``'t'``/``'f'``), so that the query's filters run on
them unchanged. It answers the same reads as the other sources (``iter_results("collections/")``,
``iter_results("collections/{cid}/images/")``, ``image(id)``, ``collection(cid)``) from memory.

Lean by construction: only the columns the API fields (and the analysis' terms) need are parsed
(``usecols``), tables are read in chunks and converted to compact columns (categoricals for codes
and labels) chunk by chunk, and an image's record dict is built only when the query examines it.
Every file is read with missing-value detection off (``keep_default_na=False``): the literal task
key ``None`` (the "None / Other" task) is a real key, not a missing value.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tarfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import quote

from nvmeta.neurovault.errors import NeuroVaultError, NotFound, UnsafeInput
from nvmeta.neurovault.ids import check_image_id

logger = logging.getLogger(__name__)

__all__ = ["ANALYSIS_LEVELS", "MAP_TYPES", "TABLES", "DumpError", "DumpSource"]

#: table -> CSV file name in the export
TABLES = {
    "collection": "statmaps_collection.csv",
    "item": "statmaps_basecollectionitem.csv",
    "image": "statmaps_image.csv",
    "statmap": "statmaps_statisticmap.csv",
    "task": "statmaps_cognitiveatlastask.csv",
    "contrast": "statmaps_cognitiveatlascontrast.csv",
}

#: database code -> the API's label (NeuroVault's ``StatisticMap.MAP_TYPE_CHOICES``)
MAP_TYPES = {
    "T": "T map",
    "Z": "Z map",
    "F": "F map",
    "X2": "Chi squared map",
    "P": "P map (given null hypothesis)",
    "IP": '1-P map ("inverted" probability)',
    "M": "multivariate-beta map",
    "U": "univariate-beta map",
    "R": "ROI/mask",
    "Pa": "parcellation",
    "A": "anatomical",
    "V": "variance",
    "Other": "other",
}
ANALYSIS_LEVELS = {"G": "group", "S": "single-subject", "M": "meta-analysis", "Other": "other"}

# API field -> (table, column, kind). kind: int, float, bool, text (empty stays ""), str (empty -> None)
_IMAGE_FIELDS: dict[str, tuple[str, str, str]] = {
    "id": ("item", "id", "int"),
    "collection_id": ("item", "collection_id", "int"),
    "name": ("item", "name", "text"),
    "description": ("item", "description", "text"),
    "add_date": ("item", "add_date", "str"),
    "modify_date": ("item", "modify_date", "str"),
    "is_valid": ("item", "is_valid", "bool"),
    "file": ("image", "file", "str"),
    "target_template_image": ("image", "target_template_image", "str"),
    "subject_species": ("image", "subject_species", "str"),
    "data_origin": ("image", "data_origin", "str"),
    "map_type": ("statmap", "map_type", "str"),
    "analysis_level": ("statmap", "analysis_level", "str"),
    "statistic_parameters": ("statmap", "statistic_parameters", "float"),
    "smoothness_fwhm": ("statmap", "smoothness_fwhm", "float"),
    "contrast_definition": ("statmap", "contrast_definition", "str"),
    "contrast_definition_cogatlas": ("statmap", "contrast_definition_cogatlas", "str"),
    "modality": ("statmap", "modality", "str"),
    "cognitive_paradigm_cogatlas_id": ("statmap", "cognitive_paradigm_cogatlas_id", "str"),
    "cognitive_contrast_cogatlas_id": ("statmap", "cognitive_contrast_cogatlas_id", "str"),
    "is_thresholded": ("statmap", "is_thresholded", "bool"),
    "not_mni": ("statmap", "not_mni", "bool"),
    "brain_coverage": ("statmap", "brain_coverage", "float"),
    "perc_bad_voxels": ("statmap", "perc_bad_voxels", "float"),
    "perc_voxels_outside": ("statmap", "perc_voxels_outside", "float"),
    "number_of_subjects": ("statmap", "number_of_subjects", "int"),
    "ignore_file_warning": ("statmap", "ignore_file_warning", "bool"),
    "cognitive_paradigm_description_url": ("statmap", "cognitive_paradigm_description_url", "str"),
}
_COLLECTION_FIELDS: dict[str, tuple[str, str]] = {
    "id": ("id", "int"),
    "name": ("name", "text"),
    "DOI": ("DOI", "str"),
    "authors": ("authors", "str"),
    "paper_url": ("paper_url", "str"),
    "description": ("description", "text"),
    "add_date": ("add_date", "str"),
    "modify_date": ("modify_date", "str"),
    "owner": ("owner_id", "int"),
    "journal_name": ("journal_name", "str"),
}
_KEYS = {"item": "id", "image": "basecollectionitem_ptr_id", "statmap": "image_ptr_id"}
_CHUNK = 200_000


class DumpError(NeuroVaultError):
    """The dump cannot be read (missing table or column, not a tar.gz of CSV tables)."""


class _HashingReader:
    """A read-only file wrapper that hashes what is read (the checksum costs no second pass)."""

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


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _convert(col: Any, kind: str) -> Any:
    """One CSV column (strings, missing-value detection off) -> the API's values, compactly."""
    import numpy as np
    import pandas as pd

    if kind == "text":
        return col.astype("category") if col.nunique() < len(col) // 2 else col
    if kind == "str":
        out = col.where(col != "")
        return out.astype("category")
    if kind == "bool":
        return col.map({"t": True, "f": False, "true": True, "false": False}).astype("boolean")
    num = pd.to_numeric(col.where(col != ""), errors="coerce")
    if kind == "int":
        rounded = num.round()
        if bool(((rounded != num) & num.notna()).any()):
            return num.astype("float64")  # e.g. number_of_subjects "20.5": kept as it is, QC judges it
        return num.astype("Int64")
    return num.astype(np.float64)


def _relabel(values: Any, fn: Any) -> Any:
    """A categorical column with each category replaced by ``fn(category)`` (None: missing)."""
    import pandas as pd

    if not isinstance(values.dtype, pd.CategoricalDtype):
        values = values.astype("category")
    cats = values.cat.categories.tolist()
    new = [fn(c) for c in cats]
    labels = pd.Index([v for v in dict.fromkeys(new) if v is not None], dtype=object)
    pos = {v: k for k, v in enumerate(labels)}
    lut = [pos[v] if v is not None else -1 for v in new] + [-1]
    import numpy as np

    codes = np.asarray(lut, dtype=np.int64)[values.cat.codes.to_numpy()]
    return pd.Series(pd.Categorical.from_codes(codes, categories=labels), index=values.index)


def _py(values: Any) -> list:
    """A pandas column as a list of plain Python values (None for missing)."""
    import pandas as pd

    if isinstance(values.dtype, pd.CategoricalDtype):
        cats = values.cat.categories.tolist()
        return [None if c < 0 else cats[c] for c in values.cat.codes.tolist()]
    if str(values.dtype) in ("Int64", "boolean"):
        return [None if v is pd.NA else v for v in values.astype(object).tolist()]
    out = values.tolist()
    if values.dtype.kind == "f":
        return [None if v != v else v for v in out]
    return out


class DumpSource:
    """Public statistic maps of a NeuroVault database export, as API records (no network).

    Parameters
    ----------
    path : path-like
        The export's ``.tar.gz`` (as published in nv-data) or its unpacked directory of CSV tables
        (the tables may sit in a sub-directory).
    media_base : str
        Media root the ``file`` column is appended to (``https://neurovault.org/media/``).
    image_fields, collection_fields : iterable of str, optional
        Extra API fields (e.g. the analysis' term fields) to read when the tables have them.
    log : logging.Logger, optional

    Attributes
    ----------
    identity : dict
        ``{"kind": "dump", "path", "bytes", "sha256"}`` of the export (for a directory: total bytes
        and the sha256 of the tables' sha256 digests, by file name).
    n_requests : int
        Always 0: the dump answers everything from memory.
    """

    mode = "download_new"

    def __init__(
        self,
        path: str | os.PathLike,
        media_base: str,
        image_fields: Iterable[str] = (),
        collection_fields: Iterable[str] = (),
        log: logging.Logger | None = None,
    ) -> None:
        self.path = Path(path).expanduser().resolve()
        self.media_base = media_base if media_base.endswith("/") else media_base + "/"
        self.log = log or logger
        self.n_requests = 0
        self.last_listing: dict | None = None
        self._extra_image = set(image_fields) - set(_IMAGE_FIELDS)
        self._extra_collection = set(collection_fields) - set(_COLLECTION_FIELDS)
        self._load()

    # -- reading -----------------------------------------------------------------------------------
    def _wanted(self, table: str, header: list[str] | None = None) -> set[str]:
        if table == "collection":
            base = {c for c, _ in _COLLECTION_FIELDS.values()} | {"private"}
            return base | self._extra_collection
        if table in ("task", "contrast"):
            return {"cog_atlas_id", "name"}
        base = {col for t, col, _ in _IMAGE_FIELDS.values() if t == table} | {_KEYS[table]}
        return base | self._extra_image

    def _read(self, table: str, fileobj: BinaryIO) -> Any:
        """One table, needed columns only, in chunks converted as they come."""
        import pandas as pd

        wanted = self._wanted(table)
        chunks = []
        try:
            reader = pd.read_csv(
                fileobj,
                usecols=lambda c: c in wanted,
                dtype=str,
                keep_default_na=False,
                na_filter=False,
                chunksize=_CHUNK,
                encoding="utf-8",
                encoding_errors="replace",
            )
            for chunk in reader:
                chunks.append(self._convert_table(table, chunk))
        except (ValueError, pd.errors.ParserError) as exc:
            raise DumpError(f"dump table {TABLES[table]}: not a readable CSV table ({exc})") from None
        if not chunks:
            raise DumpError(f"dump table {TABLES[table]} is empty (no header)")
        df = pd.concat(chunks, ignore_index=True) if len(chunks) > 1 else chunks[0]
        return df

    def _convert_table(self, table: str, chunk: Any) -> Any:
        import pandas as pd

        if table in ("task", "contrast"):
            return chunk
        out = {}
        for col in chunk.columns:
            if table == "collection":
                kind = next((k for c, k in _COLLECTION_FIELDS.values() if c == col), "str")
                if col == "private":
                    kind = "str"
            else:
                kind = next((k for t, c, k in _IMAGE_FIELDS.values() if t == table and c == col), "str")
                if col == _KEYS[table]:
                    kind = "int"
            out[col] = _convert(chunk[col], kind)
        return pd.DataFrame(out)

    def _load(self) -> None:
        tables: dict[str, Any] = {}
        if self.path.is_dir():
            files = {}
            for name, fname in TABLES.items():
                found = sorted(self.path.rglob(fname))
                if found:
                    files[name] = found[0]
            digests = hashlib.sha256()
            size = 0
            for name in sorted(files, key=lambda n: TABLES[n]):
                digests.update(f"{TABLES[name]} {_sha256(files[name])}\n".encode())
                size += files[name].stat().st_size
                with open(files[name], "rb") as fh:
                    tables[name] = self._read(name, fh)
            sha = digests.hexdigest()
        elif self.path.is_file():
            with open(self.path, "rb") as raw:
                reader = _HashingReader(raw)
                try:
                    with tarfile.open(fileobj=reader, mode="r|gz") as tar:
                        for member in tar:
                            base = member.name.rsplit("/", 1)[-1]
                            name = next((n for n, f in TABLES.items() if f == base), None)
                            if name is None or not member.isfile() or name in tables:
                                continue
                            fh = tar.extractfile(member)
                            if fh is not None:
                                tables[name] = self._read(name, fh)
                except (tarfile.TarError, OSError, EOFError) as exc:
                    raise DumpError(f"neurovault.dump: not a readable .tar.gz export ({exc})") from None
                reader.drain()
            sha, size = reader.sha.hexdigest(), reader.size
        else:
            raise DumpError(f"neurovault.dump: no such file or directory: {self.path}")
        missing = [TABLES[n] for n in ("collection", "item", "image", "statmap") if n not in tables]
        if missing:
            raise DumpError(f"neurovault.dump: table(s) {', '.join(missing)} not found in {self.path}")
        self.identity = {"kind": "dump", "path": str(self.path), "bytes": size, "sha256": sha}
        self._build(tables)

    def _build(self, t: dict[str, Any]) -> None:
        import numpy as np
        import pandas as pd

        col = t["collection"]
        for need in ("id", "private"):
            if need not in col.columns:
                raise DumpError(f"neurovault.dump: {TABLES['collection']} has no column {need!r}")
        # private collections are never selected (only an explicit 'f' is public)
        public = col[(col["private"].astype(object) == "f") & col["id"].notna()].copy()
        n_private = len(col) - len(public)
        item, image, stat = t["item"], t["image"], t["statmap"]
        for name, df, key in (
            ("item", item, "id"),
            ("image", image, _KEYS["image"]),
            ("statmap", stat, _KEYS["statmap"]),
        ):
            if key not in df.columns:
                raise DumpError(f"neurovault.dump: {TABLES[name]} has no column {key!r}")
        item = item[item["collection_id"].isin(public["id"].dropna().astype("int64"))]
        counts = item["collection_id"].value_counts()
        public["number_of_images"] = public["id"].map(counts).fillna(0).astype("int64")
        df = stat.merge(image, left_on=_KEYS["statmap"], right_on=_KEYS["image"], how="inner")
        df = df.merge(item, left_on=_KEYS["statmap"], right_on="id", how="inner", suffixes=("", "_item"))
        df = df.drop(columns=[c for c in (_KEYS["statmap"], _KEYS["image"]) if c in df.columns])
        df = df[df["id"].notna()]
        df = df.sort_values(["collection_id", "id"], kind="stable").reset_index(drop=True)
        # labels instead of codes
        if "map_type" in df.columns:
            df["map_type"] = _relabel(df["map_type"], lambda c: MAP_TYPES.get(c, c))
        if "analysis_level" in df.columns:
            df["analysis_level"] = _relabel(df["analysis_level"], lambda c: ANALYSIS_LEVELS.get(c, c))
        if "file" in df.columns:
            media = self.media_base
            df["file"] = _relabel(df["file"], lambda p: media + quote(str(p), safe="/"))
        for field, table in (
            ("cognitive_paradigm_cogatlas", "task"),
            ("cognitive_contrast_cogatlas", "contrast"),
        ):
            key_col = f"{field}_id"
            names = dict(zip(t[table]["cog_atlas_id"], t[table]["name"], strict=True)) if table in t else {}
            if key_col in df.columns:
                df[field] = _relabel(df[key_col], lambda k, names=names: names.get(k))
            else:
                df[field] = pd.Categorical([None] * len(df))
        df["image_type"] = pd.Categorical(["statistic_map"] * len(df))
        df["file_size"] = pd.array([pd.NA] * len(df), dtype="Int64")
        # the API's URL fields
        self._fields = [c for c in df.columns]
        self._columns = [_py(df[c]) for c in self._fields]
        self._ids = df["id"].to_numpy(dtype=np.int64)
        cids = df["collection_id"].to_numpy(dtype=np.int64)
        self._bounds: dict[int, tuple[int, int]] = {}
        if len(cids):
            starts = np.flatnonzero(np.r_[True, cids[1:] != cids[:-1]])
            ends = np.r_[starts[1:], len(cids)]
            self._bounds = {int(cids[s]): (int(s), int(e)) for s, e in zip(starts, ends, strict=True)}
        public = public.sort_values("id").drop(columns=["private"])
        cfields = [c for c in public.columns]
        api_name = {c: f for f, (c, _) in _COLLECTION_FIELDS.items()}
        ccols = [_py(public[c]) for c in cfields]
        self._collections = {}
        for row in zip(*ccols, strict=True):
            rec = {api_name.get(c, c): v for c, v in zip(cfields, row, strict=True)}
            rec["private"] = False
            self._collections[int(rec["id"])] = rec
        self.log.info(
            "dump %s (%d bytes, sha256 %s): %d public collections (%d private or unknown left out), "
            "%d statistic maps in public collections",
            self.path.name,
            self.identity["bytes"],
            self.identity["sha256"][:12],
            len(self._collections),
            n_private,
            len(self._ids),
        )

    # -- the source interface ------------------------------------------------------------------------
    def describe_source(self) -> dict[str, Any]:
        """Where the records came from (recorded with the selection)."""
        return dict(self.identity)

    def _record(self, i: int) -> dict[str, Any]:
        return dict(zip(self._fields, (c[i] for c in self._columns), strict=True))

    def _records(self, start: int, end: int) -> Iterator[dict[str, Any]]:
        fields = self._fields
        for row in zip(*(c[start:end] for c in self._columns), strict=True):
            yield dict(zip(fields, row, strict=True))

    def iter_results(
        self, path: str, limit: int = 1000, log: logging.Logger | None = None, **_: Any
    ) -> Iterator[dict]:
        """``collections/`` (public collections by id) or ``collections/{cid}/images/`` (by id)."""
        parts = [p for p in str(path).split("/") if p]
        if parts == ["collections"]:
            self.last_listing = {"path": path, "complete": True}
            for cid in sorted(self._collections):
                yield dict(self._collections[cid])
            return
        if len(parts) == 3 and parts[0] == "collections" and parts[2] == "images":
            cid = check_image_id(parts[1])
            self.last_listing = {"path": path, "complete": True}
            start, end = self._bounds.get(cid, (0, 0))
            yield from self._records(start, end)
            return
        raise UnsafeInput(f"the dump answers collection listings only, not {path!r}")

    def collection_images(self, cid: int | str, **_: Any) -> Iterator[dict]:
        """Image records of a public collection, by id."""
        return self.iter_results(f"collections/{check_image_id(cid)}/images/")

    def collection(self, cid: int | str) -> dict:
        """A public collection's record; NotFound for unknown or private ones."""
        c = check_image_id(cid)
        if c not in self._collections:
            raise NotFound(f"collection {c} is not a public collection of the dump")
        return dict(self._collections[c])

    def image(self, image_id: int | str) -> dict:
        """A statistic map of a public collection; NotFound otherwise (private, not a statistic map)."""
        import numpy as np

        iid = check_image_id(image_id)
        order = getattr(self, "_by_id", None)
        if order is None:
            order = self._by_id = np.argsort(self._ids, kind="stable")
        k = int(np.searchsorted(self._ids[order], iid))
        if k >= len(order) or self._ids[order[k]] != iid:
            raise NotFound(f"image {iid} is not a statistic map of a public collection in the dump")
        return self._record(int(order[k]))

    def known_fields(self) -> tuple[list[str], list[str]]:
        """API fields the dump's image and collection records carry."""
        cfields = sorted({*next(iter(self._collections.values()), {}).keys(), "number_of_images"})
        return sorted({*self._fields, "url"}), cfields

    def close(self) -> None:
        """Nothing to close."""

    def __enter__(self) -> DumpSource:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def dump_fields(analysis_cfg: Mapping[str, Any]) -> tuple[set[str], set[str]]:
    """API fields an analysis' terms name (read from the dump in addition to the standard ones)."""
    img = set((analysis_cfg.get("image_terms") or {}).keys())
    col = set((analysis_cfg.get("collection_terms") or {}).keys())
    return img, col
