"""One list of methods per stage: the schema, the rules and the report read the registries.

* The validated schema's enums are the registries' lists, and the schema file names no method itself.
* The names :mod:`nvmeta.workflow.methods` gives the image-based estimators (without importing them)
  are those the estimator classes register, with what each reads per map.
* No other file of the package, the scripts or the rules writes a method list out again: a literal
  holding three or more method names of one stage is found by :func:`_written_lists`, whose own test
  plants one.
"""

from __future__ import annotations

import ast
import re
import subprocess

import pytest
import yaml
from helpers import REPO

from nvmeta.workflow import methods
from nvmeta.workflow.config import SCHEMA_PATH, check_config, load_schema


def _node(schema: dict, path: tuple[str, ...]) -> dict:
    for part in path:
        schema = schema[part]
    return schema


def test_validated_schema_enums_are_the_registries():
    from nvmeta.cbma.estimate import ESTIMATORS as CBMA
    from nvmeta.decode.sums import METHODS as ATLAS

    schema = load_schema(SCHEMA_PATH)
    meta = _node(schema, ("$defs", "meta", "properties", "methods", "items"))["enum"]
    cbma = _node(schema, ("$defs", "cbma", "properties", "methods", "items"))["enum"]
    atlas = _node(schema, ("properties", "atlas", "properties", "method"))["enum"]
    assert meta == list(methods.meta_methods()) and cbma == list(CBMA) and atlas == list(ATLAS)
    assert "One of: ale, mkda, kda." in schema["$defs"]["cbma"]["properties"]["methods"]["description"]


def test_the_schema_file_names_no_method():
    raw = yaml.safe_load(SCHEMA_PATH.read_text())
    for path in methods.SCHEMA_ENUMS:
        assert "enum" not in _node(raw, path), path


def test_meta_names_are_the_registered_estimators():
    """The light list and the classes agree: same names, same per-map input ("z" or "effect")."""
    from nvmeta.meta.registry import ESTIMATORS

    assert {name: cls.needs for name, cls in ESTIMATORS.items()} == methods.meta_methods()
    assert methods.z_methods() + methods.effect_methods() == sorted(
        methods.meta_methods(), key=list(methods.meta_methods()).index
    )
    # the atlas combines maps with z estimators of the meta-analysis
    assert set(methods.atlas_methods()) <= set(methods.z_methods())


def test_every_method_has_its_report_text():
    from nvmeta.figures.citations import CBMA_METHODS, IBMA_METHODS

    assert set(IBMA_METHODS) == set(methods.meta_methods())
    assert set(CBMA_METHODS) == set(methods.cbma_methods())


def test_a_method_outside_the_registry_is_a_config_error(tmp_path):
    from nvmeta.errors import ConfigError

    snapshot = REPO / "tests" / "data" / "snapshot"
    cfg = {
        "neurovault": {"url": str(snapshot)},
        "analyses": {"a": {"image_ids": [1], "meta": {"methods": ["sdm"]}}},
    }
    with pytest.raises(
        ConfigError,
        match=r"analyses\.a\.meta\.methods\.0: 'sdm' is not one of .*Fix: use one of: \"stouffer\"",
    ):
        check_config(cfg, SCHEMA_PATH)


#: Each stage's method names.
_STAGES = {
    "meta": set(methods.meta_methods()),
    "cbma": set(methods.cbma_methods()),
}
#: Where a stage's names may be written out: its registry, and tables keyed by method (one entry each,
#: checked against the registry above or by their own stage's tests).
_ALLOWED = {
    "nvmeta/workflow/methods.py",  # the image-based registry of names
    "nvmeta/cbma/estimate.py",  # ESTIMATORS
    "nvmeta/decode/sums.py",  # the atlas' estimators (METHODS)
    "nvmeta/figures/citations.py",  # each method's sentence and references
    "nvmeta/meta/run.py",  # each method's figure label
}
_QUOTED = re.compile(r"""["']([a-z_]+)["']""")
_SEQUENCE = re.compile(r"""[\[({]\s*(?:["'][a-z_]+["']\s*(?::[^,\]})]*)?,\s*)+["'][a-z_]+["']""")


def _tracked() -> list:
    out = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True)
    return [REPO / p for p in out.stdout.split()]


def _written_lists(files) -> list[str]:
    """``file: names`` of every literal sequence or mapping holding 3+ method names of one stage."""
    found = []
    for path in files:
        rel = path.relative_to(REPO).as_posix()
        if rel in _ALLOWED or not path.is_file():
            continue
        text = path.read_text(errors="replace")
        if path.suffix == ".py":
            chunks = [
                ast.get_source_segment(text, node) or ""
                for node in ast.walk(ast.parse(text))
                if isinstance(node, (ast.List, ast.Tuple, ast.Set, ast.Dict))
            ]
        else:
            chunks = [m.group(0) for m in _SEQUENCE.finditer(text)]
            chunks += re.findall(r"enum:\s*\[[^\]]*\]", text)
        for chunk in chunks:
            names = set(_QUOTED.findall(chunk)) | set(
                re.findall(r"\b[a-z_]+\b", chunk) if "enum" in chunk else ()
            )
            for stage, known in _STAGES.items():
                if len(names & known) >= 3:
                    found.append(f"{rel}: {stage} {sorted(names & known)}")
    return sorted(set(found))


def test_no_method_list_is_written_twice():
    files = [
        p
        for p in _tracked()
        if p.suffix in (".py", ".smk", ".yaml")
        and p.parts[len(REPO.parts)] in ("nvmeta", "scripts", "workflow")
    ]
    assert len(files) > 50
    found = _written_lists(files)
    assert not found, f"method lists written out again (read nvmeta.workflow.methods instead): {found}"


def test_the_list_scan_finds_a_planted_list(tmp_path, monkeypatch):
    import test_methods as me

    monkeypatch.setattr(me, "REPO", tmp_path)
    (tmp_path / "a.smk").write_text('CBMA_METHODS = ["ale", "mkda", "kda"]\n')
    (tmp_path / "b.py").write_text('X = {"stouffer": 1, "fisher": 2, "ttest": 3}\nY = ["ale"]\n')
    (tmp_path / "c.yaml").write_text("items: {enum: [stouffer, fisher, ttest]}\n")
    found = me._written_lists([tmp_path / n for n in ("a.smk", "b.py", "c.yaml")])
    assert found == [
        "a.smk: cbma ['ale', 'kda', 'mkda']",
        "b.py: meta ['fisher', 'stouffer', 'ttest']",
        "c.yaml: meta ['fisher', 'stouffer', 'ttest']",
    ]


def test_nimare_map_names_are_written_once():
    """NiMARE's FWE map names are in :data:`nvmeta.cbma.estimate.FWE_MAPS` only (cbma.smk reads them)."""
    from nvmeta.cbma.estimate import BASE_MAPS, FWE_MAPS, LEVEL_MAPS

    assert set(LEVEL_MAPS.values()) <= set(FWE_MAPS) and not set(BASE_MAPS) & set(FWE_MAPS)
    # any of the CBMA's FWE map names (other NiMARE maps, e.g. PermutedOLS' p_level-voxel map in a
    # benchmark, are not CBMA outputs)
    holders = [
        p.relative_to(REPO).as_posix()
        for p in _tracked()
        if p.is_file()
        and p.suffix in (".py", ".smk", ".yaml", ".md")
        and any(name in p.read_text() for name in FWE_MAPS)
    ]
    assert holders == ["nvmeta/cbma/estimate.py"]
