"""YAML filter terms -> nilearn's NeuroVault filter objects.

A term in ``image_terms`` / ``collection_terms`` is ``field: value``:

* a plain value (string, number, boolean, null) means equality, exactly as a plain value in
  nilearn's ``image_terms`` (``record.get(field) == value``; note ``0 == False`` in Python);
* a one-key mapping ``{operator: argument}`` means an operator, mapped onto the special values of
  :mod:`nilearn.datasets.neurovault` (reused, not re-implemented):

  ============  ==========================  ==================================================
  operator      nilearn object              argument
  ============  ==========================  ==================================================
  eq            plain value                 any value (also a list: equality with a list)
  ne            ``NotEqual(arg)``           any value
  in            ``IsIn(*arg)``              list (a single value is wrapped)
  not_in        ``NotIn(*arg)``             list (a single value is wrapped)
  contains      ``Contains(*arg)``          list or single value (every item must be in it)
  not_contains  ``NotContains(*arg)``       list or single value (no item may be in it)
  gt, ge        ``GreaterThan``, ``...Or..`` number or string (the field is cast to its type)
  lt, le        ``LessThan``, ``LessOr...`` number or string
  null          ``IsNull()`` / ``NotNull()``  ``true`` (is null) / ``false`` (is not null)
  not_null      ``NotNull()`` / ``IsNull()``  ``true`` / ``false``
  pattern       ``Pattern(regex)``          regular expression, matched with ``re.match``
  ============  ==========================  ==================================================

nilearn semantics carry over: ``null``/``not_null`` test Python truthiness (``0``, ``""``, ``[]``
count as null); order comparisons cast the field to the bound's type and a failed cast
(e.g. a null field) does not match, so an int bound truncates a float field (``gt: 20`` rejects
20.5: write ``gt: 20.0`` for float fields such as ``statistic_parameters``); ``contains``/``not_contains`` never match a null field;
``pattern`` is anchored at the start (``re.match``) and only matches strings (use ``(?i)`` for
case-insensitive matching). YAML dates (``2020-01-01`` unquoted) are turned into ISO strings,
so ``modify_date: {gt: 2020-01-01}`` compares strings like nilearn's documented example.

A plain list value is rejected as ambiguous (write ``{in: [...]}`` or ``{eq: [...]}``).

``default_terms: true`` puts nilearn's ``basic_image_terms()`` / ``basic_collection_terms()``
under the user's terms (a user term on the same field replaces the default one). Under the
default terms an image whose ``not_mni`` or ``is_thresholded`` is null is rejected (nilearn
compares them with ``False`` by equality), as are atlases, ROI/mask, anatomical and parcellation
maps; a collection whose ``number_of_images`` is null or 0 is rejected.

Filters are applied to the records as the server returns them (no "None"-string normalisation).

nilearn is imported lazily: :func:`validate_terms` is pure Python (used when the Snakefile
checks the config), only :func:`build_filters` / :func:`build_terms` import nilearn.
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Callable, Mapping
from typing import Any

from nvmeta.errors import ConfigError

__all__ = [
    "OPERATORS",
    "build_filters",
    "build_terms",
    "describe_terms",
    "term_filters",
    "make_matcher",
    "parse_term",
    "parsed_terms",
    "validate_terms",
]

#: Valid operator names, in documentation order.
OPERATORS: tuple[str, ...] = (
    "eq",
    "ne",
    "in",
    "not_in",
    "contains",
    "not_contains",
    "gt",
    "ge",
    "lt",
    "le",
    "null",
    "not_null",
    "pattern",
)

_TERM_BLOCKS = ("image_terms", "collection_terms")
_SCALAR = (str, int, float, bool, type(None))

_FIX_HINT = (
    "Use a plain value for equality, or a one-key mapping {operator: argument} with operator one of: "
    + ", ".join(OPERATORS)
    + " (e.g. `map_type: {in: [T map, Z map]}`)."
)


def _plain(value: Any) -> Any:
    """Turn YAML dates into ISO strings (NeuroVault dates are strings); recurse into lists."""
    if isinstance(value, datetime.date):  # datetime.datetime is a subclass
        return value.isoformat()
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _as_list(arg: Any, path: str, op: str) -> list[Any]:
    arg = _plain(arg)
    if isinstance(arg, list):
        bad = [v for v in arg if not isinstance(v, _SCALAR)]
        if bad:
            raise ConfigError(f"{path}: `{op}` takes a list of plain values, got {bad[0]!r} in it.")
        return arg
    if isinstance(arg, Mapping):
        raise ConfigError(f"{path}: `{op}` takes a list of values (or one value), got a mapping {arg!r}.")
    return [arg]


def parse_term(value: Any, path: str) -> tuple[str, tuple[Any, ...]]:
    """Validate one YAML term and return its neutral form ``(operator, args)``.

    Parameters
    ----------
    value : object
        The YAML value of the term (plain value or one-key mapping).
    path : str
        Full config key path of the term, used in error messages.

    Returns
    -------
    tuple
        ``(op, args)`` with ``op`` in :data:`OPERATORS`; for ``eq``/``ne``/order operators and
        ``pattern`` ``args`` has one element, for ``in``/``not_in``/``contains``/``not_contains``
        it holds the items, for ``null``/``not_null`` it is ``(bool,)``.

    Raises
    ------
    ConfigError
        Unknown operator, a mapping with other than one key, a bad argument, an invalid regex.
    """
    if isinstance(value, Mapping):
        if len(value) != 1:
            keys = ", ".join(repr(k) for k in value) or "none"
            raise ConfigError(
                f"{path}: a filter mapping must have exactly one key (the operator), got {len(value)} "
                f"({keys}); one operator per field. " + _FIX_HINT
            )
        ((op, arg),) = value.items()
        if op not in OPERATORS:
            raise ConfigError(f"{path}: unknown filter operator {op!r}. " + _FIX_HINT)
        return op, _parse_arg(op, arg, f"{path}.{op}")
    if isinstance(value, list | tuple):
        raise ConfigError(
            f"{path}: a plain list is ambiguous as a filter. Write `{{in: [...]}}` to accept any of the "
            f"values, or `{{eq: [...]}}` to require a field equal to that list."
        )
    value = _plain(value)
    if not isinstance(value, _SCALAR):
        raise ConfigError(f"{path}: unsupported filter value {value!r}. " + _FIX_HINT)
    return "eq", (value,)


def _parse_arg(op: str, arg: Any, path: str) -> tuple[Any, ...]:
    if op in ("eq", "ne"):
        arg = _plain(arg)
        if isinstance(arg, Mapping):
            raise ConfigError(f"{path}: `{op}` takes a plain value or a list, got a mapping {arg!r}.")
        return (arg,)
    if op in ("in", "not_in", "contains", "not_contains"):
        return tuple(_as_list(arg, path, op))
    if op in ("gt", "ge", "lt", "le"):
        arg = _plain(arg)
        if isinstance(arg, bool) or not isinstance(arg, int | float | str):
            raise ConfigError(
                f"{path}: `{op}` takes a number or a string (e.g. a date `2020-01-01`), got {arg!r}."
            )
        return (arg,)
    if op in ("null", "not_null"):
        if not isinstance(arg, bool):
            raise ConfigError(f"{path}: `{op}` takes true or false (e.g. `{{{op}: true}}`), got {arg!r}.")
        return (arg,)
    # pattern
    if not isinstance(arg, str):
        raise ConfigError(f"{path}: `pattern` takes a regular expression string, got {arg!r}.")
    try:
        re.compile(arg)
    except re.error as exc:
        raise ConfigError(
            f"{path}: invalid regular expression {arg!r}: {exc}. Fix the pattern (it is matched at the "
            f"start of the value with Python's re.match; quote it in YAML)."
        ) from exc
    return (arg,)


def make_matcher(op: str, args: tuple[Any, ...]) -> Any:
    """Return the nilearn object (or plain value) for a parsed term ``(op, args)``."""
    from nilearn.datasets import neurovault as nv

    if op == "eq":
        return args[0]
    if op == "ne":
        return nv.NotEqual(args[0])
    simple = {
        "in": nv.IsIn,
        "not_in": nv.NotIn,
        "contains": nv.Contains,
        "not_contains": nv.NotContains,
    }
    if op in simple:
        return simple[op](*args)
    order = {
        "gt": nv.GreaterThan,
        "ge": nv.GreaterOrEqual,
        "lt": nv.LessThan,
        "le": nv.LessOrEqual,
    }
    if op in order:
        return order[op](args[0])
    if op == "null":
        return nv.IsNull() if args[0] else nv.NotNull()
    if op == "not_null":
        return nv.NotNull() if args[0] else nv.IsNull()
    if op == "pattern":
        return nv.Pattern(args[0])
    raise ValueError(f"unknown operator {op!r}")  # unreachable after parse_term


def _terms_block(analysis_cfg: Mapping[str, Any], block: str, key_prefix: str) -> Mapping[str, Any]:
    terms = analysis_cfg.get(block)
    if terms is None:
        return {}
    if not isinstance(terms, Mapping):
        raise ConfigError(
            f"{key_prefix}.{block}: must be a mapping of field: filter (e.g. `map_type: T map`), "
            f"got {type(terms).__name__}."
        )
    for field in terms:
        if not isinstance(field, str) or not field:
            raise ConfigError(f"{key_prefix}.{block}: field names must be non-empty strings, got {field!r}.")
    return terms


def _default_terms_flag(analysis_cfg: Mapping[str, Any], key_prefix: str) -> bool:
    flag = analysis_cfg.get("default_terms", True)
    if flag is None:
        return True
    if not isinstance(flag, bool):
        raise ConfigError(
            f"{key_prefix}.default_terms: must be true (apply nilearn's basic_image_terms() and "
            f"basic_collection_terms() under your terms) or false, got {flag!r}."
        )
    return flag


def parsed_terms(
    analysis_cfg: Mapping[str, Any], key_prefix: str
) -> dict[str, dict[str, tuple[str, tuple[Any, ...]]]]:
    """Validate and parse the user's terms (no defaults) without importing nilearn.

    Returns
    -------
    dict
        ``{"image_terms": {field: (op, args)}, "collection_terms": {...}}``.
    """
    out: dict[str, dict[str, tuple[str, tuple[Any, ...]]]] = {}
    for block in _TERM_BLOCKS:
        terms = _terms_block(analysis_cfg, block, key_prefix)
        out[block] = {
            field: parse_term(value, f"{key_prefix}.{block}.{field}") for field, value in terms.items()
        }
    return out


def validate_terms(analysis_cfg: Mapping[str, Any], key_prefix: str) -> None:
    """Check an analysis' ``image_terms``, ``collection_terms`` and ``default_terms``.

    Parameters
    ----------
    analysis_cfg : mapping
        One ``config["analyses"][name]`` block.
    key_prefix : str
        Its key path, e.g. ``"analyses.pain"`` (used in error messages).

    Raises
    ------
    ConfigError
        With the full key path of the offending term and how to fix it.
    """
    _default_terms_flag(analysis_cfg, key_prefix)
    parsed_terms(analysis_cfg, key_prefix)


def build_terms(analysis_cfg: Mapping[str, Any], key_prefix: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Return the effective ``(image_terms, collection_terms)`` as nilearn term dicts.

    Defaults (when ``default_terms`` is true) come first, then the user's terms override the
    same fields. Values are plain values or :mod:`nilearn.datasets.neurovault` special values.
    """
    from nilearn.datasets import neurovault as nv

    use_defaults = _default_terms_flag(analysis_cfg, key_prefix)
    parsed = parsed_terms(analysis_cfg, key_prefix)
    image_terms: dict[str, Any] = dict(nv.basic_image_terms()) if use_defaults else {}
    collection_terms: dict[str, Any] = dict(nv.basic_collection_terms()) if use_defaults else {}
    for field, (op, args) in parsed["image_terms"].items():
        image_terms[field] = make_matcher(op, args)
    for field, (op, args) in parsed["collection_terms"].items():
        collection_terms[field] = make_matcher(op, args)
    return image_terms, collection_terms


def build_filters(
    analysis_cfg: Mapping[str, Any], key_prefix: str
) -> tuple[Callable[[Mapping[str, Any]], bool], Callable[[Mapping[str, Any]], bool]]:
    """Build the client-side ``(image_filter, collection_filter)`` of an analysis.

    Both are nilearn ``ResultFilter`` objects: called with a record (dict), they return True
    when ``record.get(field) == matcher`` holds for every term.

    As in nilearn (``_move_col_id``), a ``collection_id`` image term is also applied to the
    collection's ``id``, so that non-matching collections are skipped without listing their
    images; the image filter keeps the term too (a harmless re-check).

    Parameters
    ----------
    analysis_cfg : mapping
        One ``config["analyses"][name]`` block.
    key_prefix : str
        Its key path, e.g. ``"analyses.pain"``.

    Returns
    -------
    tuple of callables
        ``(image_filter, collection_filter)``.
    """
    from nilearn.datasets.neurovault import ResultFilter

    image_terms, collection_terms = build_terms(analysis_cfg, key_prefix)
    image_filter = ResultFilter(query_terms=image_terms)
    collection_filter = ResultFilter(query_terms=collection_terms)
    if "collection_id" in image_terms:
        collection_filter = collection_filter.AND(
            ResultFilter(query_terms={"id": image_terms["collection_id"]})
        )
    return image_filter, collection_filter


def describe_terms(analysis_cfg: Mapping[str, Any], key_prefix: str) -> str:
    """One-line human description of the effective terms (for logs)."""
    image_terms, collection_terms = build_terms(analysis_cfg, key_prefix)
    return f"image_terms={image_terms!r}; collection_terms={collection_terms!r}"


def term_filters(
    analysis_cfg: Mapping[str, Any], key_prefix: str
) -> tuple[dict[str, tuple[str, Callable[[Mapping[str, Any]], bool]]], dict[str, tuple[str, Any]]]:
    """One filter per effective term, for the query's funnel (records rejected per term).

    The conjunction of a block's filters is exactly :func:`build_filters`' filter of that block
    (each is a nilearn ``ResultFilter`` on one term, the same matcher objects).

    Returns
    -------
    tuple of dict
        ``(image, collection)``, each ``{label: (field, filter)}`` with ``label`` the term's key
        path (``"image_terms.map_type"``, with `` (default_terms)`` appended for nilearn's
        default terms the user did not override).
    """
    from nilearn.datasets.neurovault import ResultFilter

    image_terms, collection_terms = build_terms(analysis_cfg, key_prefix)
    parsed = parsed_terms(analysis_cfg, key_prefix)
    out: list[dict[str, tuple[str, Any]]] = []
    for block, terms in (("image_terms", image_terms), ("collection_terms", collection_terms)):
        filters = {}
        for field, matcher in terms.items():
            label = f"{block}.{field}" + ("" if field in parsed[block] else " (default_terms)")
            filters[label] = (field, ResultFilter(query_terms={field: matcher}))
        out.append(filters)
    if "collection_id" in image_terms:
        out[1]["image_terms.collection_id (on the collection id)"] = (
            "id",
            ResultFilter(query_terms={"id": image_terms["collection_id"]}),
        )
    return out[0], out[1]


def absent_field_ok(analysis_cfg: Mapping[str, Any], block: str, field: str, key_prefix: str) -> bool:
    """Whether a term on ``field`` may legitimately name a field no record carries.

    Only a test for missing values does (``{null: true}`` / ``{not_null: false}``); any other term
    on an absent field is almost always a misspelling that would select nothing (or everything).
    """
    parsed = parsed_terms(analysis_cfg, key_prefix)[block]
    if field not in parsed:
        return False
    op, args = parsed[field]
    return (op == "null" and args[0] is True) or (op == "not_null" and args[0] is False)
