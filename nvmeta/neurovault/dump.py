"""The dump source: select from a NeuroVault database export (nv-data) without any API request.

NeuroVault publishes exports of its database (``NeuroVault/nv-data`` on GitHub: a ``.tar.gz`` of one
CSV file per table of the ``statmaps`` application, see ``docs/neurovault-dump.md``). This source
reads such an export (the ``.tar.gz`` itself or its unpacked directory), keeps the public collections
only, and normalises every statistic map to the field names and labels of the REST API's records
(``map_type: T map``, ``analysis_level: group``, ``cognitive_paradigm_cogatlas`` = the task's name,
``file`` = the public media URL, booleans, keys and numbers parsed by
:mod:`nvmeta.neurovault.dump_columns`), so that the query's filters run on them unchanged. Which files
make the one export, its digest and the bound on a field's size: :mod:`nvmeta.neurovault.dump_files`.
What the dump leaves out before any term (private collections, rows with an invalid key) and the
values it keeps as written are counted by reason (:meth:`DumpSource.source_counts`, in the query's
funnel). It answers the same reads as the other sources (``iter_results("collections/")``,
``iter_results("collections/{cid}/images/")``, ``image(id)``, ``collection(cid)``) from memory.

Lean by construction: only the columns the API fields (and the analysis' terms) need are parsed
(``usecols``), tables are read in chunks and converted to compact columns (categoricals for codes
and labels) chunk by chunk, and an image's record dict is built only when the query examines it.
Every file is read with missing-value detection off (``keep_default_na=False``): the literal task
key ``None`` (the "None / Other" task) is a real key, not a missing value.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import quote

from nvmeta.neurovault.dump_columns import check_unique, convert, py_values, relabel
from nvmeta.neurovault.dump_files import TABLES, DumpError, iter_tables
from nvmeta.neurovault.errors import NotFound, UnsafeInput
from nvmeta.neurovault.ids import check_image_id

logger = logging.getLogger(__name__)

__all__ = ["ANALYSIS_LEVELS", "MAP_TYPES", "TABLES", "DumpError", "DumpSource", "dump_fields"]

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

# API field -> (table, column, kind); kinds: nvmeta.neurovault.dump_columns.convert
_IMAGE_FIELDS: dict[str, tuple[str, str, str]] = {
    "id": ("item", "id", "key"),
    "collection_id": ("item", "collection_id", "key"),
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
    "id": ("id", "key"),
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
_KEYS = {"item": "id", "image": "basecollectionitem_ptr_id", "statmap": "image_ptr_id", "collection": "id"}
#: columns a table must have (the joins, privacy, the task and contrast names, the file)
_REQUIRED = {
    "collection": ("id", "private"),
    "item": ("id", "collection_id"),
    "image": ("basecollectionitem_ptr_id", "file"),
    "statmap": ("image_ptr_id",),
    "task": ("cog_atlas_id", "name"),
    "contrast": ("cog_atlas_id", "name"),
}
_KINDS = {
    "collection": {c: k for c, k in _COLLECTION_FIELDS.values()} | {"private": "bool"},
    **{
        t: {c: k for tt, c, k in _IMAGE_FIELDS.values() if tt == t} | {_KEYS[t]: "key"}
        for t in ("item", "image", "statmap")
    },
}
_CHUNK = 200_000
_PRIVATE = "private collection (private = true)"
_PRIVACY_UNKNOWN = "collection of unknown privacy (private empty: not selected)"


def _postgres_bools(col: Any) -> bool:
    """Whether a column the API fields do not name holds PostgreSQL's booleans only (``t``/``f``)."""
    import pandas as pd

    values = {v for v in pd.unique(col) if isinstance(v, str) and v}
    return bool(values) and values <= {"t", "f"}


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
        Extra API fields (e.g. the analysis' term fields) to read when the tables have them (a
        column holding only PostgreSQL's ``t``/``f`` becomes a boolean, as the API serves it).
    log : logging.Logger, optional
    max_field_bytes : int
        Largest CSV field accepted (``neurovault.max_dump_field_bytes``).

    Raises
    ------
    DumpError
        Not one readable export (see :mod:`~nvmeta.neurovault.dump_files`), a required table or
        column missing, a key appearing twice, a boolean column holding another spelling.

    Attributes
    ----------
    identity : dict
        ``{"kind": "dump", "path", "bytes", "sha256"}`` of the export (for a directory: total bytes
        and the sha256 of the tables' sha256 digests, by file name: the digest
        :func:`~nvmeta.neurovault.dump_files.dump_digest` computes).
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
        *,
        max_field_bytes: int,
    ) -> None:
        self.path = Path(path).expanduser().resolve()
        self.media_base = media_base if media_base.endswith("/") else media_base + "/"
        self.log = log or logger
        self.n_requests = 0
        self.last_listing: dict | None = None
        self.max_field_bytes = max_field_bytes
        self._extra_image = set(image_fields) - set(_IMAGE_FIELDS)
        self._extra_collection = set(collection_fields) - set(_COLLECTION_FIELDS)
        self.excluded: Counter = Counter()
        self.notes: Counter = Counter()
        tables, self.identity = iter_tables(self.path, self.max_field_bytes, self._read)
        missing = [TABLES[n] for n in ("collection", "item", "image", "statmap") if n not in tables]
        if missing:
            raise DumpError(f"neurovault.dump: table(s) {', '.join(missing)} not found in {self.path}")
        self._build(tables)

    # -- reading -----------------------------------------------------------------------------------
    def _wanted(self, table: str) -> set[str]:
        if table in ("task", "contrast"):
            return {"cog_atlas_id", "name"}
        extra = self._extra_collection if table == "collection" else self._extra_image
        return set(_KINDS[table]) | extra

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
                if not chunks:
                    self._check_columns(table, chunk.columns)
                chunks.append(self._convert_table(table, chunk))
        except (ValueError, pd.errors.ParserError) as exc:
            raise DumpError(f"dump table {TABLES[table]}: not a readable CSV table ({exc})") from None
        df = pd.concat(chunks, ignore_index=True) if len(chunks) > 1 else chunks[0]
        for col in set(df.columns) - set(_KINDS.get(table, {})) - {"cog_atlas_id", "name"}:
            if _postgres_bools(df[col]):  # a field the terms name, stored as a database boolean
                df[col] = df[col].astype(object).map({"t": True, "f": False}).astype("boolean")
        if table in ("task", "contrast"):
            check_unique(table, df, "cog_atlas_id")
        elif table in _KEYS:
            df = df[df[_KEYS[table]].notna()]
            check_unique(table, df, _KEYS[table])
        return df

    def _check_columns(self, table: str, columns: Iterable[str]) -> None:
        missing = [c for c in _REQUIRED[table] if c not in set(columns)]
        if missing:
            raise DumpError(
                f"neurovault.dump: {TABLES[table]} has no column {', '.join(map(repr, missing))} "
                f"(nvmeta needs {', '.join(_REQUIRED[table])}). Fix: use an unmodified NeuroVault "
                "export (docs/neurovault-dump.md lists the tables and columns)."
            )

    def _convert_table(self, table: str, chunk: Any) -> Any:
        import pandas as pd

        if table in ("task", "contrast"):
            return chunk
        kinds = _KINDS[table]
        return pd.DataFrame(
            {
                col: convert(
                    chunk[col],
                    kinds.get(col, "str"),
                    f"{TABLES[table]} column {col}",
                    self.excluded,
                    self.notes,
                )
                for col in chunk.columns
            }
        )

    def _public_collections(self, col: Any) -> Any:
        """The public collections (``private`` explicitly false); the others are counted."""
        private = col["private"]
        self.excluded[_PRIVATE] += int(private.eq(True).sum())
        self.excluded[_PRIVACY_UNKNOWN] += int(private.isna().sum())
        return col[private.eq(False).fillna(False)].copy()

    def _build(self, t: dict[str, Any]) -> None:
        import numpy as np
        import pandas as pd

        public = self._public_collections(t["collection"])
        item, image, stat = t["item"], t["image"], t["statmap"]
        item = item[item["collection_id"].notna() & item["collection_id"].isin(public["id"].astype("int64"))]
        counts = item["collection_id"].value_counts()
        public["number_of_images"] = public["id"].map(counts).fillna(0).astype("int64")
        df = stat.merge(image, left_on=_KEYS["statmap"], right_on=_KEYS["image"], how="inner")
        df = df.merge(item, left_on=_KEYS["statmap"], right_on="id", how="inner", suffixes=("", "_item"))
        df = df.drop(columns=[c for c in (_KEYS["statmap"], _KEYS["image"]) if c in df.columns])
        df = df.sort_values(["collection_id", "id"], kind="stable").reset_index(drop=True)
        # labels instead of codes
        if "map_type" in df.columns:
            df["map_type"] = relabel(df["map_type"], lambda c: MAP_TYPES.get(c, c))
        if "analysis_level" in df.columns:
            df["analysis_level"] = relabel(df["analysis_level"], lambda c: ANALYSIS_LEVELS.get(c, c))
        media = self.media_base
        df["file"] = relabel(df["file"], lambda p: media + quote(str(p), safe="/"))
        for field, table in (
            ("cognitive_paradigm_cogatlas", "task"),
            ("cognitive_contrast_cogatlas", "contrast"),
        ):
            key_col = f"{field}_id"
            names = dict(zip(t[table]["cog_atlas_id"], t[table]["name"], strict=True)) if table in t else {}
            if key_col in df.columns:
                df[field] = relabel(df[key_col], lambda k, names=names: names.get(k))
            else:
                df[field] = pd.Categorical([None] * len(df))
        df["image_type"] = pd.Categorical(["statistic_map"] * len(df))
        df["file_size"] = pd.array([pd.NA] * len(df), dtype="Int64")
        self._fields = list(df.columns)
        self._columns = [py_values(df[c]) for c in self._fields]
        self._ids = df["id"].to_numpy(dtype=np.int64)
        cids = df["collection_id"].to_numpy(dtype=np.int64)
        self._bounds: dict[int, tuple[int, int]] = {}
        if len(cids):
            starts = np.flatnonzero(np.r_[True, cids[1:] != cids[:-1]])
            ends = np.r_[starts[1:], len(cids)]
            self._bounds = {int(cids[s]): (int(s), int(e)) for s, e in zip(starts, ends, strict=True)}
        public = public.sort_values("id").drop(columns=["private"])
        cfields = list(public.columns)
        api_name = {c: f for f, (c, _) in _COLLECTION_FIELDS.items()}
        ccols = [py_values(public[c]) for c in cfields]
        self._collections = {}
        for row in zip(*ccols, strict=True):
            rec = {api_name.get(c, c): v for c, v in zip(cfields, row, strict=True)}
            rec["private"] = False
            self._collections[int(rec["id"])] = rec
        self.excluded = Counter({k: v for k, v in self.excluded.items() if v})
        for what, counts in (("left out", self.excluded), ("kept as written", self.notes)):
            for reason, n in sorted(counts.items()):
                # private collections are a normal part of every export; anything else is a defect of the file
                level = logging.INFO if reason == _PRIVATE else logging.WARNING
                self.log.log(level, "dump %s: %d %s: %s", self.path.name, n, what, reason)
        self.log.info(
            "dump %s (%d bytes, sha256 %s): %d public collections, %d statistic maps in public collections",
            self.path.name,
            self.identity["bytes"],
            self.identity["sha256"][:12],
            len(self._collections),
            len(self._ids),
        )

    # -- the source interface ------------------------------------------------------------------------
    def describe_source(self) -> dict[str, Any]:
        """Where the records came from (recorded with the selection)."""
        return dict(self.identity)

    def source_counts(self) -> dict[str, dict[str, int]]:
        """What the dump left out before any term (``excluded``: private collections, rows with an
        invalid key) and values it kept as written (``flagged``), by reason, for the query's funnel."""
        return {"excluded": dict(sorted(self.excluded.items())), "flagged": dict(sorted(self.notes.items()))}

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
