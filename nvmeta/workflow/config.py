"""Configuration checks run before any job: schema validation with friendly messages,
defaults, and the semantic checks a JSON schema cannot express.

Every problem is raised as :class:`nvmeta.errors.ConfigError` whose message names the
config key and says how to fix it.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import re
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from nvmeta.errors import ConfigError

#: The one config schema; every default lives here and nowhere else.
SCHEMA_PATH = Path(__file__).resolve().parents[2] / "workflow" / "schemas" / "config.schema.yaml"
#: Blocks that :func:`defaults` knows: top-level keys and per-analysis ``$defs`` blocks.
_ANALYSIS_BLOCKS = ("meta", "ica", "cbma", "decode")


def _dotted(path: Any) -> str:
    parts = [str(p) for p in path]
    return ".".join(parts) if parts else "(top level)"


def _schema_node(schema: dict, path: list[Any]) -> dict:
    """Best-effort lookup of the schema node describing ``path`` (for the 'fix' hint)."""
    node = schema
    defs = schema.get("$defs", {})
    for key in path:
        if "$ref" in node:
            node = defs.get(node["$ref"].rsplit("/", 1)[-1], {})
        props = node.get("properties", {})
        if key in props:
            node = props[key]
        elif isinstance(node.get("additionalProperties"), dict):
            node = node["additionalProperties"]
        else:
            return {}
    if "$ref" in node:
        node = defs.get(node["$ref"].rsplit("/", 1)[-1], node)
    return node


def schema_errors(config: dict, schema: dict) -> list[str]:
    """Return one friendly message per JSON-schema violation (empty when valid)."""
    import jsonschema

    validator = jsonschema.Draft202012Validator(schema)
    messages = []
    for err in sorted(validator.iter_errors(config), key=lambda e: list(map(str, e.absolute_path))):
        path = list(err.absolute_path)
        if err.validator == "additionalProperties":
            node = _schema_node(schema, path)
            allowed = sorted(node.get("properties", {}))
            extra = sorted(set(err.instance) - set(allowed)) if isinstance(err.instance, dict) else []
            for key in extra:
                messages.append(
                    f"config key {_dotted([*path, key])}: unknown key. "
                    f"Fix: remove it or use one of: {', '.join(allowed)}."
                )
            continue
        if "propertyNames" in err.relative_schema_path:
            messages.append(
                f"config key {_dotted([*path, err.instance])}: invalid name (it must match the "
                f"pattern {err.validator_value!r}, because it names output folders). "
                "Fix: use only letters, digits, '_' and '-', starting with a letter or digit."
            )
            continue
        node = _schema_node(schema, path)
        default = f" (default: {json.dumps(node['default'])})" if "default" in node else ""
        allowed = _allowed(node)
        if err.validator in _RANGE_VALIDATORS and allowed:
            messages.append(
                f"config key {_dotted(path)} = {json.dumps(err.instance)} is out of range. "
                f"Fix: give {allowed}{default}."
            )
            continue
        if err.validator == "type" and allowed:
            fix = f"Fix: give {allowed}{default}."
        elif err.validator == "enum":
            fix = f"Fix: use one of: {', '.join(json.dumps(v) for v in err.validator_value)}{default}."
        elif node.get("description"):
            fix = f"Fix: {node['description']}{default}"
        else:
            fix = "Fix: see README's config reference."
        messages.append(f"config key {_dotted(path)}: {err.message}. {fix}")
    return messages


#: JSON-schema keywords that bound a number: their "Fix:" states the allowed range.
_RANGE_VALIDATORS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")


def _number(value: float) -> str:
    if isinstance(value, int) or (float(value).is_integer() and abs(value) >= 1000):
        return f"{int(value):,}"
    return repr(value)


def _allowed(node: dict) -> str | None:
    """What a numeric schema node accepts, in words ("an integer >= 10 and <= 100,000"), else None."""
    types = node.get("type", [])
    types = [types] if isinstance(types, str) else list(types)
    kind = "an integer" if "integer" in types else "a number" if "number" in types else None
    if kind is None:
        return None
    bounds = [
        f"{op} {_number(node[key])}"
        for key, op in (
            ("minimum", ">="),
            ("exclusiveMinimum", ">"),
            ("maximum", "<="),
            ("exclusiveMaximum", "<"),
        )
        if key in node
    ]
    text = " and ".join([kind + (" " + bounds[0] if bounds else ""), *bounds[1:]])
    return text + (", or null" if "null" in types else "")


def load_schema(schema_path: str | os.PathLike) -> dict:
    """Load the YAML schema safely, with the method lists of the registries as its enums.

    The schema file names no method: each node of :data:`nvmeta.workflow.methods.SCHEMA_ENUMS` gets
    its ``enum`` here, and the key it belongs to a last sentence naming them (README's config
    reference and the "Fix:" of a config error show it), so a method is named in its registry only.
    """
    import yaml

    from nvmeta.workflow.methods import SCHEMA_ENUMS

    schema = yaml.safe_load(Path(schema_path).read_text())
    for path, names in SCHEMA_ENUMS.items():
        key = node = schema
        for part in path:
            node = node[part]
            if part != "items":
                key = node
        node["enum"] = names()
        key["description"] = f"{key['description'].rstrip()} One of: {', '.join(node['enum'])}."
    return schema


#: Upper bound on the values a config may hold once YAML aliases are expanded. A 1 KB file of
#: nested aliases (a "billion laughs" bomb) expands tenfold per level; validating 10^7 values
#: takes a minute. 200 000 leaves room for very long ``image_ids`` lists.
MAX_CONFIG_VALUES = 200_000
#: Analysis names become folder names (results/analyses/<name>) and Snakemake wildcards.
ANALYSIS_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
#: Where the workflow writes; nothing it reads as configuration may live there.
RESULTS_DIR = "results"
#: Tables of conversion overrides keyed by image or collection id, with an example entry.
_OVERRIDE_TABLES = {
    "df_images": "{12345: 18}",
    "n_images": "{12345: 20}",
    "df_collections": "{1425: 18}",
    "n_collections": "{1425: 20}",
    "design_images": "{12345: {design: two_sample, n1: 10, n2: 12}}",
    "design_collections": "{1425: {design: two_sample, n1: 10, n2: 12}}",
}


def check_config(
    config: dict,
    schema_path: str | os.PathLike,
    basedir: str | os.PathLike = ".",
    configfiles: Iterable[str | os.PathLike] = (),
) -> dict:
    """Validate ``config`` in place, fill every schema default, and return it.

    After this call every key the schema knows is present, including the nested
    per-analysis ``meta``/``ica`` blocks (those that are not null): consumers index keys
    directly and never re-default.

    Parameters
    ----------
    config : dict
        The Snakemake config (already loaded safely from YAML by Snakemake).
    schema_path : path-like
        ``workflow/schemas/config.schema.yaml``.
    basedir : path-like
        Directory relative paths (mask, snapshot) are resolved against (the working directory).
    configfiles : iterable of path-like
        The files ``config`` was loaded from, read again for keys given twice in one mapping (a YAML
        loader keeps the last one silently, so the merged ``config`` cannot show them).

    Raises
    ------
    ConfigError
        With every problem found, each naming its key and the fix.
    """
    from nvmeta.workflow.config_files import duplicate_key_problems

    problems = duplicate_key_problems(configfiles)
    if problems:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(problems))
    # Cheap structural checks first: they bound the cost of everything after them.
    problems = _size_problems(config)
    if problems:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(problems))
    problems = _name_problems(config)
    schema = load_schema(schema_path)
    if not problems:
        problems = schema_errors(config, schema)
    if problems:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(problems))
    # snakemake.utils.validate(set_default=True) is not used: it fails on the nullable
    # per-analysis blocks (meta: null) and does not fill defaults under additionalProperties
    # (each analysis); fill_defaults walks the same schema and fills every level.
    fill_defaults(config, schema, schema.get("$defs", {}))
    for name, analysis in config["analyses"].items():
        problems.extend(_check_analysis(name, analysis))
    problems.extend(_check_overrides(config["conversion"]))
    problems.extend(_check_decoding(config))
    from nvmeta.images.record_rules import pattern_problems

    problems.extend(pattern_problems(config["qc"]))
    problems.extend(_check_paths(config, Path(basedir)))
    if problems:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(problems))
    # Consumers get read-only blocks: nothing downstream can re-default or patch a value.
    # The top-level mapping stays Snakemake's own dict (workflow.config).
    for key in list(config):
        config[key] = freeze(config[key])
    return config


def _read_only(self, *args, **kwargs):
    raise TypeError(
        "the validated config is read-only (its defaults come from the schema only); "
        "copy the block first, e.g. {**cfg, 'key': value}"
    )


class FrozenDict(dict):
    """A validated config mapping: a real ``dict`` (JSON, ``repr``, ``==``, pickling into
    Snakemake script jobs and params hashing behave as for a dict) that refuses changes."""

    __slots__ = ()
    __setitem__ = __delitem__ = __ior__ = _read_only
    clear = pop = popitem = setdefault = update = _read_only

    def __reduce__(self):
        return (FrozenDict, (dict(self),))

    def __copy__(self):
        return self

    def __deepcopy__(self, memo):
        return self


class FrozenList(list):
    """A validated config list (see :class:`FrozenDict`)."""

    __slots__ = ()
    __setitem__ = __delitem__ = __iadd__ = __imul__ = _read_only
    append = clear = extend = insert = pop = remove = reverse = sort = _read_only

    def __reduce__(self):
        return (FrozenList, (list(self),))

    def __copy__(self):
        return self

    def __deepcopy__(self, memo):
        return self


def freeze(value: Any) -> Any:
    """``value`` with every mapping and list made read-only (recursively)."""
    if isinstance(value, dict):
        return FrozenDict({k: freeze(v) for k, v in value.items()})
    if isinstance(value, list):
        return FrozenList(freeze(v) for v in value)
    return value


def check_config_or_exit(
    config: dict,
    schema_path: str | os.PathLike,
    basedir: str | os.PathLike = ".",
    configfiles: Iterable[str | os.PathLike] = (),
) -> dict:
    """:func:`check_config` for the Snakefile: a broken config prints its message and exits 1.

    Snakemake shows an exception raised while the Snakefile is parsed with a partial traceback;
    a config error is the user's to fix, not a bug, so it is printed as is (stderr) instead.
    """
    try:
        return check_config(config, schema_path, basedir, configfiles)
    except ConfigError as exc:
        print(f"nvmeta: {exc}\nNothing was run.", file=sys.stderr)
        raise SystemExit(1) from None


def fill_defaults(instance: Any, node: dict, defs: dict) -> Any:
    """Fill, in place, every default the schema ``node`` declares for ``instance`` (recursively).

    An absent key gets a deep copy of its default, then the defaults below it; a null value
    stays null (``meta: null`` = not run). Objects under ``additionalProperties`` (each analysis)
    are filled with that sub-schema's defaults.
    """
    if "$ref" in node:
        node = defs[node["$ref"].rsplit("/", 1)[-1]]
    if not isinstance(instance, dict):
        return instance
    for key, sub in node.get("properties", {}).items():
        target = defs[sub["$ref"].rsplit("/", 1)[-1]] if "$ref" in sub else sub
        if key not in instance:
            if "default" not in target:
                continue
            instance[key] = copy.deepcopy(target["default"])
        fill_defaults(instance[key], target, defs)
    extra = node.get("additionalProperties")
    if isinstance(extra, dict) and ("properties" in extra or "$ref" in extra):
        known = node.get("properties", {})
        for key, value in instance.items():
            if key not in known:
                fill_defaults(value, extra, defs)
    return instance


def _expanded_size(value: Any, memo: dict[int, int]) -> int:
    """Number of values ``value`` holds with YAML aliases expanded (shared objects counted
    every time they occur), computed in time proportional to the *unexpanded* document."""
    if not isinstance(value, (dict, list)):
        return 1
    key = id(value)
    if key not in memo:
        memo[key] = 0  # a (non-YAML) cycle counts once instead of recursing forever
        items = value.values() if isinstance(value, dict) else value
        memo[key] = 1 + sum(_expanded_size(v, memo) for v in items)
    return memo[key]


def _size_problems(config: Any) -> list[str]:
    if not isinstance(config, dict):
        return [
            f"config: the config file holds a {type(config).__name__}, not a mapping. Fix: start from config/config.yaml."
        ]
    memo: dict[int, int] = {}
    total = _expanded_size(config, memo)
    if total <= MAX_CONFIG_VALUES:
        return []
    # Name the smallest key that is too large on its own (where the aliases are).
    path: list[Any] = []
    node: Any = config
    while isinstance(node, (dict, list)):
        items = list(node.items()) if isinstance(node, dict) else list(enumerate(node))
        big = [(k, v) for k, v in items if _expanded_size(v, memo) > MAX_CONFIG_VALUES]
        if not big:
            break
        path.append(big[0][0])
        node = big[0][1]
    return [
        f"config key {_dotted(path)}: expands to {total:,} values once YAML aliases (*name) are "
        f"expanded, more than the {MAX_CONFIG_VALUES:,} a config may hold (an alias bomb?). "
        "Fix: write the values out instead of nesting aliases, or select images with terms or "
        "collection_ids instead of very long id lists."
    ]


def _name_problems(config: dict) -> list[str]:
    """Analysis names must be strings usable as folder names and wildcards."""
    analyses = config.get("analyses")
    if not isinstance(analyses, dict):
        return []
    problems = []
    for name in analyses:
        key = f"analyses.{name!r}" if isinstance(name, str) else f"analyses.{name}"
        if isinstance(name, bool):
            problems.append(
                f"config key {key}: YAML reads this analysis name as the boolean {name} (yes, no, "
                "on, off, true and false are booleans in YAML). Fix: quote the name "
                "(e.g. 'yes': ...) or rename it."
            )
        elif not isinstance(name, str):
            problems.append(
                f"config key {key}: YAML reads this analysis name as the {type(name).__name__} "
                f"{name!r}, not a name. Fix: quote it (e.g. '{name}': ...) or start it with a letter."
            )
        elif not ANALYSIS_NAME.fullmatch(name):
            problems.append(
                f"config key {key}: invalid analysis name (it names the folder "
                "results/analyses/<name>, so it must be 1-64 characters: letters, digits, '_' and "
                "'-', starting with a letter or digit, no spaces or line breaks). Fix: rename it."
            )
    return problems


def _check_analysis(name: str, analysis: dict) -> list[str]:
    from nvmeta.select.filters import validate_terms

    problems: list[str] = []
    key = f"analyses.{name}"
    try:
        validate_terms(analysis, key)
    except ConfigError as exc:
        problems.append(f"config key {exc}")
    if analysis["meta"] is not None:
        from nvmeta.meta.dependence import problems as dependence_problems

        problems.extend(dependence_problems(analysis["meta"], f"{key}.meta"))
    explicit = analysis["image_ids"] or analysis["collection_ids"]
    terms = analysis["image_terms"] or analysis["collection_terms"]
    if not explicit and not terms and analysis["max_images"] is None:
        problems.append(
            f"config key {key}: selects no images. Fix: give image_ids, collection_ids, "
            "image_terms/collection_terms, or max_images (the first max_images images passing "
            "the default terms, like nilearn's fetch_neurovault)."
        )
    return problems


def _check_decoding(config: dict) -> list[str]:
    """The atlas' selection terms, and what every ``decode`` block needs (an atlas, something to decode)."""
    from nvmeta.decode.atlas import selection_cfg
    from nvmeta.select.filters import validate_terms

    problems: list[str] = []
    atlas = config["atlas"]
    if atlas is not None:
        try:
            validate_terms(selection_cfg(atlas), "atlas")
        except ConfigError as exc:
            problems.append(f"config key {exc}")
    for name, analysis in config["analyses"].items():
        if analysis.get("decode") is None:
            continue
        key = f"analyses.{name}.decode"
        if atlas is None:
            problems.append(
                f"config key {key}: decoding needs a task atlas to decode against. Fix: add a "
                "top-level `atlas: {}` block (README, 'Decoding'), or remove the decode block."
            )
        if all(analysis.get(block) is None for block in ("meta", "cbma", "ica")):
            problems.append(
                f"config key {key}: the analysis has no result map to decode (no meta, cbma or ica "
                "block). Fix: add one of them, or remove the decode block."
            )
    return problems


def _is_id(key: Any) -> bool:
    if isinstance(key, bool):
        return False
    if isinstance(key, int):
        return key >= 1
    return isinstance(key, str) and re.fullmatch(r"[1-9][0-9]*", key) is not None


def _check_overrides(conversion: dict) -> list[str]:
    """Override tables are keyed by NeuroVault ids: any other key would be silently ignored."""
    problems = []
    for table, example in _OVERRIDE_TABLES.items():
        what = "image" if table.endswith("images") else "collection"
        for key in conversion[table]:
            if not _is_id(key):
                problems.append(
                    f"config key conversion.{table}.{key}: {key!r} is not a NeuroVault {what} id, so "
                    f"this entry would never apply. Fix: key the table by {what} id "
                    f"(a positive integer, e.g. {example})."
                )
    return problems


def _check_paths(config: dict, basedir: Path) -> list[str]:
    problems = []
    mask = config["template"]["mask"]
    if mask != "mni152_2mm":
        path = Path(mask) if Path(mask).is_absolute() else basedir / mask
        results = (basedir / RESULTS_DIR).resolve()
        if path.resolve().is_relative_to(results):
            problems.append(
                f"config key template.mask: {mask!r} lies in {RESULTS_DIR}/, which the workflow "
                "writes (the template it makes from the mask is itself there). Fix: copy the mask "
                f"outside {RESULTS_DIR}/ (e.g. config/mask.nii.gz) and point template.mask at the copy."
            )
        elif not path.is_file():
            problems.append(
                f"config key template.mask: mask file {mask!r} does not exist. "
                "Fix: give 'mni152_2mm' or the path of an existing 3-D mask NIfTI."
            )
    url = config["neurovault"]["url"]
    if url.startswith(("http://", "https://")):
        parts = urlsplit(url)
        if parts.username is not None or parts.password is not None:
            # The URL itself is not repeated: it holds a password.
            problems.append(
                "config key neurovault.url: the URL holds credentials (user:password@host). They "
                "would be sent with every request and recorded in .snakemake/metadata. Fix: remove "
                f"the 'user:password@' part ({parts.scheme}://{parts.netloc.rsplit('@', 1)[-1]}{parts.path}); "
                "NeuroVault's "
                "read API needs no login."
            )
    else:
        path = Path(url) if Path(url).is_absolute() else basedir / url
        if not path.is_dir():
            problems.append(
                f"config key neurovault.url: {url!r} is neither an http(s) URL nor an existing "
                "snapshot directory. Fix: use https://neurovault.org/api/ or a snapshot directory."
            )
        elif not (path / "api").is_dir():
            problems.append(
                f"config key neurovault.url: directory {url!r} has no api/ folder, so it is not a "
                "snapshot. Fix: point it at a directory laid out as described in README (Snapshot layout)."
            )
    return problems


def _node_defaults(node: dict, defs: dict, top: bool = True) -> Any:
    """Defaults of a schema node: its properties' defaults, recursively, or its own default.

    A nested optional block whose default is null (an analysis' ``meta``) stays null.
    """
    if "$ref" in node:
        node = defs[node["$ref"].rsplit("/", 1)[-1]]
    props = node.get("properties")
    if props and (top or node.get("default", {}) is not None):
        return {key: _node_defaults(sub, defs, top=False) for key, sub in props.items()}
    return json.loads(json.dumps(node.get("default")))


@functools.lru_cache(maxsize=1)
def _schema() -> dict:
    """The schema of :data:`SCHEMA_PATH`, loaded once per process (callers copy what they hand out)."""
    return load_schema(SCHEMA_PATH)


@functools.lru_cache(maxsize=1)
def _schema_file() -> dict:
    """:data:`SCHEMA_PATH` as written, without the method lists (no registry is imported)."""
    import yaml

    return yaml.safe_load(SCHEMA_PATH.read_text())


def schema_node(key: str) -> dict[str, Any]:
    """A copy of the schema node of a config key as the file writes it (no method list, so no registry
    is imported: the query rule's params read it), for what a node says besides its default.

    Parameters
    ----------
    key : str
        The key as README's config reference names it: ``"conversion.df"``,
        ``"analyses.<name>.max_images"`` (``<name>``: any analysis), ``"analyses.<name>.meta.alpha"``.
    """
    schema = _schema_file()
    defs = schema.get("$defs", {})
    node = schema
    for part in key.split("."):
        if "$ref" in node:
            node = defs[node["$ref"].rsplit("/", 1)[-1]]
        node = node["additionalProperties"] if part == "<name>" else node["properties"][part]
    if "$ref" in node:
        node = defs[node["$ref"].rsplit("/", 1)[-1]]
    return copy.deepcopy(node)


def defaults(block: str) -> dict[str, Any]:
    """The schema's defaults for one config block, as a fresh dict.

    The schema is the only place a default lives: modules never hold their own defaults;
    tests and benchmarks that build a block by hand start from ``{**defaults("meta"), ...}``.

    Parameters
    ----------
    block : str
        A top-level key (``"neurovault"``, ``"conversion"``, ``"qc"``, ``"template"``) or a
        per-analysis block (``"meta"``, ``"ica"``, ...), or ``"analysis"`` for one analysis.
    """
    schema = _schema()
    defs = schema.get("$defs", {})
    if block in defs and block in _ANALYSIS_BLOCKS:
        return _node_defaults(defs[block], defs)
    if block == "analysis":
        return _node_defaults(schema["properties"]["analyses"]["additionalProperties"], defs)
    if block in schema["properties"]:
        return _node_defaults(schema["properties"][block], defs)
    raise KeyError(f"no config block {block!r} in {SCHEMA_PATH.name}")
