"""The values of a NeuroVault database export's CSV columns, parsed once and the same way everywhere.

Every table is read as text with missing-value detection off (``docs/neurovault-dump.md``: the task
key ``None`` is a real key), then each column is turned into the API's values here:

* **booleans** (``private``, ``is_valid``, ``is_thresholded``, ``not_mni``, ...): one parser for every
  boolean column, :func:`parse_bool` (``t``/``f``, ``true``/``false``, ``1``/``0``, ``yes``/``no``, any
  case; empty = unknown). Any other spelling is an error naming the table, the column and the value:
  a column that holds something else than booleans is a damaged or shifted table, and guessing would
  make e.g. every collection private or public.
* **keys** (``id``, ``collection_id``, the ``*_ptr_id`` joins): positive decimal integers. A row whose
  key is anything else (``abc``, empty, ``5.0``) is left out and counted under its reason (the
  query's funnel shows it); a key that appears twice is an error (the export's keys are unique, and
  which duplicate would win is arbitrary).
* **numbers** (``number_of_subjects``, ``statistic_parameters``, ...): a value that is not a finite
  number (``twenty``, ``nan``, ``0x14``, ``inf``, ``1e400``) is *kept as written* (a string) and
  counted, so that the image's own QC can say what it was instead of seeing a missing value.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from nvmeta.neurovault.dump_files import TABLES, DumpError
from nvmeta.neurovault.ids import MAX_ID

__all__ = ["BOOLEANS", "check_unique", "convert", "parse_bool", "py_values", "relabel"]

_TRUE = frozenset({"t", "true", "1", "yes"})
_FALSE = frozenset({"f", "false", "0", "no"})
#: the spellings :func:`parse_bool` accepts (any case)
BOOLEANS = "t/f, true/false, 1/0, yes/no"
#: numbers beyond this are not kept as ints (not exactly representable as floats either)
_MAX_EXACT = 2**53


def parse_bool(value: str, where: str = "value") -> bool | None:
    """A boolean field of the export: True, False, or None when empty.

    Raises
    ------
    DumpError
        Any spelling but :data:`BOOLEANS` (any case, surrounding blanks ignored) or empty.
    """
    v = value.strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    if v == "":
        return None
    raise DumpError(f"{where}: {value[:40]!r} is not a boolean ({BOOLEANS}, or empty for unknown)")


def _bools(col: Any, where: str) -> Any:
    """A column of booleans (pandas ``boolean``; empty -> NA), parsed once per distinct spelling."""
    import pandas as pd

    spellings = pd.unique(col)
    try:
        lut = {s: parse_bool(s, where) for s in spellings}
    except DumpError as exc:
        bad = next(s for s in spellings if s.strip().lower() not in _TRUE | _FALSE | {""})
        raise DumpError(
            f"neurovault.dump: {exc} in {int((col == bad).sum())} row(s). Fix: use an unmodified export "
            "(a column of other values means a damaged or shifted table)."
        ) from None
    return col.map(lut).astype("boolean")


def _keys(col: Any, where: str, excluded: Counter) -> Any:
    """Positive decimal integer keys (Int64 with NA for invalid ones, counted in ``excluded``)."""
    import numpy as np
    import pandas as pd

    num = pd.to_numeric(col.where(col != ""), errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    ok = np.isfinite(num) & (num >= 1) & (num <= MAX_ID)
    ok &= np.where(ok, num, 0) % 1 == 0
    # written as plain digits only: as many characters as the number has digits (not "5.0", "05",
    # " 5", "+5" or "5e0"); a vector test, as a regular expression per row costs seconds at 560,000 rows
    digits = np.searchsorted(10.0 ** np.arange(13), np.where(ok, num, 1), side="right")
    ok &= col.str.len().to_numpy() == digits
    out = pd.Series(np.where(ok, num, np.nan), index=col.index).astype("Int64")
    n_bad = int((~ok).sum())
    if n_bad:
        excluded[f"{where}: not a positive integer (row left out)"] += n_bad
    return out


def _numbers(col: Any, kind: str, where: str, notes: Counter) -> Any:
    """A numeric column; values that are not finite numbers are kept as written (and counted)."""
    import numpy as np
    import pandas as pd

    text = col.where(col != "")
    num = pd.to_numeric(text, errors="coerce")
    bad = text.notna().to_numpy() & ~np.isfinite(num.to_numpy(dtype=np.float64, na_value=np.nan))
    bad |= np.abs(num.to_numpy(dtype=np.float64, na_value=0.0)) > _MAX_EXACT
    num = num.where(~bad)
    if kind == "int" and bool((num.dropna() % 1 == 0).all()):
        out = num.astype("Int64")
    else:  # e.g. number_of_subjects "20.5": kept as it is, the image's QC judges it
        out = num.astype(np.float64)
    if bad.any():
        notes[f"{where}: not a finite number (kept as written)"] += int(bad.sum())
        out = out.astype(object)
        out[bad] = text[bad]
    return out


def convert(col: Any, kind: str, where: str, excluded: Counter, notes: Counter) -> Any:
    """One CSV column (strings) -> the API's values, compactly (categoricals for repeated strings).

    Parameters
    ----------
    col : pandas.Series
        The column as read (str, missing-value detection off).
    kind : {"text", "str", "bool", "key", "int", "float"}
        ``text``: kept, empty stays ""; ``str``: empty -> None; ``bool``: :func:`parse_bool`;
        ``key``: :func:`_keys`; ``int``/``float``: numbers (see the module docstring).
    where : str
        ``"<table file> column <name>"``, for messages and counts.
    excluded, notes : collections.Counter
        Rows left out (invalid keys) and values kept as written, by reason.
    """
    if kind == "text":
        return col.astype("category") if col.nunique() < len(col) // 2 else col
    if kind == "str":
        return col.where(col != "").astype("category")
    if kind == "bool":
        return _bools(col, where)
    if kind == "key":
        return _keys(col, where, excluded)
    return _numbers(col, kind, where, notes)


def check_unique(table: str, df: Any, key: str) -> None:
    """Raise :class:`DumpError` when a key of ``table`` appears in more than one row."""
    values = df[key]
    dup = values[values.duplicated(keep=False) & values.notna()]
    if len(dup):
        shown = ", ".join(str(v) for v in list(dict.fromkeys(dup.tolist()))[:5])
        raise DumpError(
            f"neurovault.dump: {TABLES[table]} has {len(dup)} rows sharing a {key} ({shown}{', ...' if dup.nunique() > 5 else ''}); "
            "an export's keys are unique, so which row holds the truth is unknown. Fix: use an "
            "unmodified export (or remove the duplicated rows)."
        )


def relabel(values: Any, fn: Any) -> Any:
    """A categorical column with each category replaced by ``fn(category)`` (None: missing)."""
    import numpy as np
    import pandas as pd

    if not isinstance(values.dtype, pd.CategoricalDtype):
        values = values.astype("category")
    cats = values.cat.categories.tolist()
    new = [fn(c) for c in cats]
    labels = pd.Index([v for v in dict.fromkeys(new) if v is not None], dtype=object)
    pos = {v: k for k, v in enumerate(labels)}
    lut = [pos[v] if v is not None else -1 for v in new] + [-1]
    codes = np.asarray(lut, dtype=np.int64)[values.cat.codes.to_numpy()]
    return pd.Series(pd.Categorical.from_codes(codes, categories=labels), index=values.index)


def py_values(values: Any) -> list:
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
    if values.dtype.kind == "O":  # numbers mixed with values kept as written
        return [None if v is None or v is pd.NA or (isinstance(v, float) and v != v) else v for v in out]
    return out
