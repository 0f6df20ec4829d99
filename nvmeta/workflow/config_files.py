"""Checks of the config files themselves, which the merged ``config`` dict cannot show.

Snakemake loads ``configfile:`` / ``--configfile`` with a YAML (or JSON) loader that keeps the last of two
equal keys in one mapping without a word, so a second ``pain:`` block under ``analyses`` silently replaces
the first. :func:`duplicate_key_problems` reads the same files again and names every repeated key with both
lines.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

__all__ = ["duplicate_key_problems"]


def _dotted(path: list[Any]) -> str:
    return ".".join(str(p) for p in path) if path else "(top level)"


def duplicate_key_problems(paths: Iterable[str | os.PathLike]) -> list[str]:
    """One message per key given twice in one mapping of a config file (both line numbers).

    YAML (and JSON) loaders keep the last of two equal keys without a word: a second ``pain:`` block
    under ``analyses`` would silently replace the first. The files are composed again with PyYAML's
    safe loader (nodes only, nothing constructed but the keys) so each key keeps its line.
    """
    import yaml

    problems: list[tuple[str, int, str]] = []
    for path in paths:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue  # Snakemake read it a moment ago and reports its own errors for it
        shown = _shown_path(path)
        try:
            root = yaml.compose(text, Loader=yaml.SafeLoader)
        except yaml.YAMLError:
            # JSON that YAML cannot read (tabs): Snakemake read it as JSON, which has no lines to name
            problems.extend((shown, 0, msg) for msg in _json_duplicates(text, shown))
            continue
        problems.extend((shown, line, msg) for line, msg in _yaml_duplicates(root, shown))
    return [msg for *_, msg in sorted(problems)]


def _shown_path(path: str | os.PathLike) -> str:
    """``path`` relative to the working directory when it lies below it (as the user typed it)."""
    p = Path(path)
    try:
        return str(p.resolve().relative_to(Path.cwd().resolve()))
    except (OSError, ValueError):
        return str(p)


def _yaml_duplicates(root: Any, shown: str) -> list[tuple[int, str]]:
    import yaml

    keys = yaml.SafeLoader("")  # constructs key scalars only, so `1` and `01` are one key as in YAML
    out: list[tuple[int, str]] = []
    seen: set[int] = set()
    stack: list[tuple[Any, list[Any]]] = [(root, [])]
    while stack:
        node, path = stack.pop()
        if node is None or id(node) in seen:  # an aliased node is checked once (no alias-bomb walk)
            continue
        seen.add(id(node))
        if isinstance(node, yaml.SequenceNode):
            stack.extend((item, [*path, i]) for i, item in enumerate(node.value))
        if not isinstance(node, yaml.MappingNode):
            continue
        first: dict[Any, int] = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *base` then a key of its own is YAML's override, not a repeat
            try:
                key = keys.construct_object(key_node, deep=True)
                hash(key)
            except (yaml.YAMLError, TypeError):
                key = (key_node.tag, str(key_node.value))
            line = key_node.start_mark.line + 1
            if key in first:
                out.append(
                    (
                        line,
                        f"config key {_dotted([*path, key])}: given twice in {shown} (lines {first[key]} "
                        f"and {line}); YAML would silently keep only the second. Fix: merge the two into "
                        "one entry, or rename one of them.",
                    )
                )
            else:
                first[key] = line
            stack.append((value_node, [*path, key]))
    return out


def _json_duplicates(text: str, shown: str) -> list[str]:
    out: list[str] = []

    def pairs(items: list[tuple[str, Any]]) -> dict:
        names = [k for k, _ in items]
        out.extend(
            f"config key {k}: given twice in one object of {shown}; JSON would silently keep only the "
            "second. Fix: merge the two into one entry, or rename one of them."
            for k in sorted({k for k in names if names.count(k) > 1})
        )
        return dict(items)

    try:
        json.loads(text, object_pairs_hook=pairs)
    except ValueError:
        return []
    return out
