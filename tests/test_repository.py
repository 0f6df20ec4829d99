"""The repository keeps itself honest: schema and code cannot disagree, nothing points outside it.

* Config defaults live only in ``workflow/schemas/config.schema.yaml``: no module holds a
  ``*DEFAULTS`` dict, every schema key has a description and a default, and every config key the
  code reads exists in the schema.
* No code, doc or test refers to a file a clone does not contain (``../shared``, ``contracts.md``).
"""

from __future__ import annotations

import ast
import re
import subprocess

import pytest
import yaml
from helpers import REPO

SCHEMA = yaml.safe_load((REPO / "workflow" / "schemas" / "config.schema.yaml").read_text())
#: Names the code gives to config blocks (``config["qc"]`` is ``qc_cfg`` in nvmeta/images/qc.py, ...).
CONFIG_NAMES = r"(?:config|cfg|nv_cfg|qc_cfg|conv|conversion|analysis_cfg|analysis|meta_cfg|ica_cfg)"
KEY_READ = re.compile(
    r"\b"
    + CONFIG_NAMES
    + r"""((?:\[\s*["'][A-Za-z_][A-Za-z0-9_]*["']\s*\])+|\.get\(\s*["'][A-Za-z_][A-Za-z0-9_]*["'])"""
)
KEY = re.compile(r"""["']([A-Za-z_][A-Za-z0-9_]*)["']""")


def _schema_nodes(node: dict, path: str):
    """(dotted path, node) of every property in the schema, ``$defs`` blocks included."""
    for key, sub in node.get("properties", {}).items():
        yield f"{path}.{key}" if path else key, sub
        yield from _schema_nodes(sub, f"{path}.{key}" if path else key)
    extra = node.get("additionalProperties")
    if isinstance(extra, dict):
        yield from _schema_nodes(extra, f"{path}.<name>")


def _all_nodes():
    yield from _schema_nodes(SCHEMA, "")
    for name, block in SCHEMA.get("$defs", {}).items():
        yield from _schema_nodes(block, f"$defs.{name}")


SCHEMA_KEYS = {path.rsplit(".", 1)[-1] for path, _ in _all_nodes()}


def _tracked(*patterns: str) -> list:
    out = subprocess.run(["git", "ls-files", *patterns], cwd=REPO, capture_output=True, text=True, check=True)
    return [REPO / p for p in out.stdout.split() if (REPO / p).is_file()]


def test_every_schema_key_has_a_description_and_a_default():
    missing = [
        path
        for path, node in _all_nodes()
        if "$ref" not in node and (not node.get("description") or "default" not in node)
    ]
    assert not missing, f"schema keys without description or default: {missing}"


def _key_reads() -> dict[str, set[str]]:
    """config key -> files reading it (``config["x"]``, ``cfg.get("x")``, ...)."""
    files = [
        p for p in _tracked("nvmeta", "scripts", "workflow", "Snakefile") if p.suffix in (".py", ".smk", "")
    ]
    reads: dict[str, set[str]] = {}
    for path in files:
        for chain in KEY_READ.findall(path.read_text()):
            for key in KEY.findall(chain):
                reads.setdefault(key, set()).add(str(path.relative_to(REPO)))
    return reads


@pytest.mark.parametrize("key", sorted(_key_reads()))
def test_every_config_key_the_code_reads_is_in_the_schema(key):
    assert key in SCHEMA_KEYS, (
        f"{key!r} is read by {sorted(_key_reads()[key])} but absent from the schema: add it there"
    )


def test_key_scan_sees_the_reads():
    """The scan is not vacuous: it sees the reads the workflow is built on."""
    reads = _key_reads()
    assert {"analyses", "max_connections", "n_perm", "min_coverage"} <= set(reads)
    assert "workflow/rules/common.smk" in reads["max_connections"]


def _module_defaults() -> list[str]:
    found = []
    for path in (REPO / "nvmeta").rglob("*.py"):
        for node in ast.parse(path.read_text()).body:
            targets = (
                node.targets
                if isinstance(node, ast.Assign)
                else [node.target]
                if isinstance(node, ast.AnnAssign)
                else []
            )
            for target in targets:
                if isinstance(target, ast.Name) and target.id.upper().endswith("DEFAULTS"):
                    found.append(f"{path.relative_to(REPO)}:{node.lineno} {target.id}")
    return found


def test_no_module_holds_its_own_defaults():
    """Config defaults live in the schema only: ``nvmeta.workflow.config.defaults(block)`` hands them out."""
    found = _module_defaults()
    assert not found, f"module-level defaults dicts (use nvmeta.workflow.config.defaults instead): {found}"


def test_defaults_scan_sees_a_defaults_dict(tmp_path, monkeypatch):
    """The scan above can fail: it finds a planted module-level ``DEFAULTS`` dict."""
    import test_repository as me

    fake = tmp_path / "nvmeta"
    fake.mkdir()
    (fake / "x.py").write_text('QC_DEFAULTS: dict = {"a": 1}\nother = 1\n')
    monkeypatch.setattr(me, "REPO", tmp_path)
    assert me._module_defaults() == ["nvmeta/x.py:1 QC_DEFAULTS"]


OUTSIDE = re.compile(r"\.\./shared|/work/shared|contracts\.md")


def _outside_refs() -> dict[str, list[str]]:
    out = {}
    for path in _tracked():
        if (
            path.suffix not in (".py", ".smk", ".md", ".rst", ".yaml", ".toml", "")
            or path.name == "test_repository.py"
        ):
            continue
        if path.match(
            "tests/data/make_demo_snapshot.py"
        ):  # a maintainer's tool; takes the sample path as argument
            continue
        hits = [
            line.strip() for line in path.read_text(errors="replace").splitlines() if OUTSIDE.search(line)
        ]
        if hits:
            out[str(path.relative_to(REPO))] = hits
    return out


def test_nothing_refers_to_files_outside_the_repository():
    refs = _outside_refs()
    assert not refs, refs
    for doc in re.findall(
        r"docs/[\w.-]+\.md", "".join(p.read_text() for p in _tracked("nvmeta", "README.md"))
    ):
        assert (REPO / doc).is_file(), doc


def test_install_brings_what_snakemake_report_needs():
    """`snakemake --report` after the Quickstart install needs Snakemake's `reports` extra."""
    import importlib.metadata
    import tomllib

    from packaging.requirements import Requirement

    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    req = Requirement(next(d for d in deps if d.startswith("snakemake")))
    assert req.name == "snakemake" and req.extras == {"reports"}
    # the installed Snakemake is within the supported range
    assert req.specifier.contains(importlib.metadata.version("snakemake")), (
        req,
        importlib.metadata.version("snakemake"),
    )
    import pygments  # noqa: F401  (what --report asked for after the plain install)


def test_ci_runs_the_linters_before_the_suite():
    lines = [
        line for line in (REPO / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")
    ]
    steps = [
        ".venv/bin/pip install -q -e '.[test,slurm]'",
        ".venv/bin/ruff check .",
        ".venv/bin/ruff format --check .",
        ".venv/bin/snakefmt --check .",
        ".venv/bin/snakemake --lint",
        ".venv/bin/python -m pytest",
    ]
    where = [next(i for i, line in enumerate(lines) if step in line) for step in steps]
    assert where == sorted(where) and "set -euo pipefail" in lines


#: Modules that may call ``nvmeta.workflow.config.defaults``: the schema's own module, the test-data
#: builders, and command-line entry points (functions named ``main``), which have no config to read.
_DEFAULTS_CALLERS = ("nvmeta/workflow/config.py", "nvmeta/testing/")
#: Still completing a partial block from the schema (``{**defaults("meta"), **cfg}``); to go.
_DEFAULTS_PENDING = {"nvmeta/meta/run.py"}


def _defaults_calls(root) -> list[str]:
    """``file:line`` of every ``defaults(...)`` call in ``root/nvmeta`` outside the allowed places."""
    found = []
    for path in sorted((root / "nvmeta").rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if rel.startswith(_DEFAULTS_CALLERS) or rel in _DEFAULTS_PENDING:
            continue
        tree = ast.parse(path.read_text())
        in_main = {
            id(n)
            for f in ast.walk(tree)
            if isinstance(f, ast.FunctionDef) and f.name == "main"
            for n in ast.walk(f)
        }
        for node in ast.walk(tree):
            func = getattr(node, "func", None)
            name = getattr(func, "id", getattr(func, "attr", None))
            if isinstance(node, ast.Call) and name == "defaults" and id(node) not in in_main:
                found.append(f"{rel}:{node.lineno}")
    return found


def test_the_production_path_takes_the_validated_blocks():
    """No module completes a partial config block from the schema's defaults: what the workflow hands
    over is validated and complete, and tests build blocks as ``{**defaults("qc"), ...}``."""
    assert not _defaults_calls(REPO), "read the validated block instead of completing it from defaults()"


def test_defaults_scan_sees_a_completion(tmp_path):
    (tmp_path / "nvmeta" / "images").mkdir(parents=True)
    (tmp_path / "nvmeta" / "images" / "x.py").write_text(
        "def f(cfg):\n    return {**defaults('qc'), **cfg}\n\n\ndef main():\n    return defaults('qc')\n"
    )
    assert _defaults_calls(tmp_path) == ["nvmeta/images/x.py:2"]


STAGES = {"select", "neurovault", "images", "meta", "cbma", "ica", "decode", "figures", "workflow"}
RULE_DEF = re.compile(r"^(?:rule|checkpoint) (\w+):", re.M)


def _architecture_rows(readme: str) -> list[list[str]]:
    """Cells of the table in the README's "Architecture" section, one list per stage."""
    section = readme.split("\n## Architecture\n", 1)[1].split("\n## ", 1)[0]
    rows = [
        line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| stage ")
    ]
    return [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in rows]


def _architecture_problems(root) -> tuple[list[str], set[str]]:
    """(names in the README's architecture table that do not exist under ``root``, rules it names).

    A bare module is looked for in its row's package, a bare rule in the rule file before it."""
    missing, named_rules = [], set()
    for stage, rules, package, scripts, tests in _architecture_rows((root / "README.md").read_text()):
        names = re.findall(r"`([^`]+)`", package)
        pkg = next((n for n in names if n.startswith("nvmeta/") and n.endswith("/")), "")
        for name in names:
            if not (root / (name if "/" in name else pkg + name)).exists():
                missing.append(f"{stage}: {name if '/' in name else pkg + name}")
        for name in re.findall(r"`([^`]+)`", scripts + tests):
            if not (root / name).is_file():
                missing.append(f"{stage}: {name}")
        for part in rules.split(";"):
            files, sep, rule_names = part.partition("`:")
            files = re.findall(r"`([^`]+)`", files + sep[:1])
            for name in files:
                if not (root / name).is_file():
                    missing.append(f"{stage}: {name}")
            if not sep:
                continue
            text = (root / files[-1]).read_text() if (root / files[-1]).is_file() else ""
            for rule in re.findall(r"`(\w+)`", rule_names):
                named_rules.add(rule)
                if rule not in RULE_DEF.findall(text):
                    missing.append(f"{stage}: rule {rule} in {files[-1]}")
    return missing, named_rules


def test_the_architecture_table_names_what_exists_and_every_rule():
    """README, "Architecture": every stage has its row, every file, module and rule it names exists,
    and every rule of the workflow is in the table."""
    stages = {row[0] for row in _architecture_rows((REPO / "README.md").read_text())}
    assert stages == STAGES
    missing, named = _architecture_problems(REPO)
    assert not missing, missing
    defined = {
        r for p in (REPO / "workflow" / "rules").glob("*.smk") for r in RULE_DEF.findall(p.read_text())
    }
    assert len(defined) > 20 and named == defined, (defined - named, named - defined)


def test_the_architecture_check_sees_a_missing_module_and_rule(tmp_path):
    (tmp_path / "nvmeta" / "select").mkdir(parents=True)
    (tmp_path / "nvmeta" / "select" / "query.py").write_text("")
    (tmp_path / "workflow" / "rules").mkdir(parents=True)
    (tmp_path / "workflow" / "rules" / "query.smk").write_text("checkpoint query:\n")
    row = "| select | `workflow/rules/query.smk`: `query`, `quer` | `nvmeta/select/`: `query.py`, `qery.py` | | |"
    (tmp_path / "README.md").write_text(
        f"# x\n\n## Architecture\n\n| stage | a | b | c | d |\n|---|\n{row}\n\n## Next\n"
    )
    missing, named = _architecture_problems(tmp_path)
    assert missing == ["select: nvmeta/select/qery.py", "select: rule quer in workflow/rules/query.smk"]
    assert named == {"query", "quer"}
