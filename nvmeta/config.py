"""Configuration checks run before any job: schema validation with friendly messages,
defaults, and the semantic checks a JSON schema cannot express.

Every problem is raised as :class:`nvmeta.errors.ConfigError` whose message names the
config key and says how to fix it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from nvmeta.errors import ConfigError

#: The one config schema; every default lives here and nowhere else.
SCHEMA_PATH = Path(__file__).resolve().parents[1] / "workflow" / "schemas" / "config.schema.yaml"
#: Blocks that :func:`defaults` knows: top-level keys and per-analysis ``$defs`` blocks.
_ANALYSIS_BLOCKS = ("meta", "ica", "cbma")


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
        hint = node.get("description", "")
        default = node.get("default", None)
        fix = f"Fix: {hint}" if hint else "Fix: see README's config reference."
        if "default" in node:
            fix += f" (default: {json.dumps(default)})"
        messages.append(f"config key {_dotted(path)}: {err.message}. {fix}")
    return messages


def load_schema(schema_path: str | os.PathLike) -> dict:
    """Load the YAML schema safely."""
    import yaml

    return yaml.safe_load(Path(schema_path).read_text())


def check_config(config: dict, schema_path: str | os.PathLike, basedir: str | os.PathLike = ".") -> dict:
    """Validate ``config`` in place (defaults filled) and return it.

    Parameters
    ----------
    config : dict
        The Snakemake config (already loaded safely from YAML by Snakemake).
    schema_path : path-like
        ``workflow/schemas/config.schema.yaml``.
    basedir : path-like
        Directory relative paths (mask, snapshot) are resolved against (the working directory).

    Raises
    ------
    ConfigError
        With every problem found, each naming its key and the fix.
    """
    schema = load_schema(schema_path)
    problems = schema_errors(config, schema)
    if problems:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(problems))
    from snakemake.utils import validate

    validate(config, str(schema_path), set_default=True)
    for name, analysis in config["analyses"].items():
        normalize_analysis(analysis)
        problems.extend(_check_analysis(name, analysis))
    problems.extend(_check_paths(config, Path(basedir)))
    if problems:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(problems))
    return config


def normalize_analysis(analysis: dict) -> dict:
    """Fill the defaults the schema cannot set through ``$ref`` and nested nulls."""
    analysis.setdefault("image_ids", [])
    analysis.setdefault("collection_ids", [])
    analysis["image_terms"] = analysis.get("image_terms") or {}
    analysis["collection_terms"] = analysis.get("collection_terms") or {}
    analysis.setdefault("default_terms", True)
    analysis.setdefault("max_images", None)
    analysis.setdefault("meta", None)
    analysis.setdefault("ica", None)
    analysis.setdefault("cbma", None)
    return analysis


def _check_analysis(name: str, analysis: dict) -> list[str]:
    from nvmeta.filters import validate_terms

    problems: list[str] = []
    key = f"analyses.{name}"
    try:
        validate_terms(analysis, key)
    except ConfigError as exc:
        problems.append(f"config key {exc}")
    explicit = analysis["image_ids"] or analysis["collection_ids"]
    terms = analysis["image_terms"] or analysis["collection_terms"]
    if not explicit and not terms and analysis["max_images"] is None:
        problems.append(
            f"config key {key}: selects no images. Fix: give image_ids, collection_ids, "
            "image_terms/collection_terms, or max_images (the first max_images images passing "
            "the default terms, like nilearn's fetch_neurovault)."
        )
    if analysis["meta"] is None and analysis["ica"] is None:
        # Still valid (selection, downloads, QC only), but say so.
        pass
    return problems


def _check_paths(config: dict, basedir: Path) -> list[str]:
    problems = []
    mask = config["template"]["mask"]
    if mask != "mni152_2mm":
        path = Path(mask) if Path(mask).is_absolute() else basedir / mask
        if not path.is_file():
            problems.append(
                f"config key template.mask: mask file {mask!r} does not exist. "
                "Fix: give 'mni152_2mm' or the path of an existing 3-D mask NIfTI."
            )
    url = config["neurovault"]["url"]
    if not url.startswith(("http://", "https://")):
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
    schema = load_schema(SCHEMA_PATH)
    defs = schema.get("$defs", {})
    if block in defs and block in _ANALYSIS_BLOCKS:
        return _node_defaults(defs[block], defs)
    if block == "analysis":
        return _node_defaults(schema["properties"]["analyses"]["additionalProperties"], defs)
    if block in schema["properties"]:
        return _node_defaults(schema["properties"][block], defs)
    raise KeyError(f"no config block {block!r} in {SCHEMA_PATH.name}")
