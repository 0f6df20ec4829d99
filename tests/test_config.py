"""Config checks: a broken config stops before any job with a message naming the key and the fix."""

from __future__ import annotations

import pytest
from helpers import REPO, make_workdir, run_snakemake

from nvmeta.errors import ConfigError
from nvmeta.workflow.config import check_config

SCHEMA = REPO / "workflow" / "schemas" / "config.schema.yaml"


def base() -> dict:
    return {
        "neurovault": {"url": "https://neurovault.org/api/"},
        "analyses": {"a": {"image_ids": [151, 3041], "meta": {"methods": ["stouffer"]}}},
    }


def test_defaults_filled():
    cfg = check_config(base(), SCHEMA)
    assert cfg["neurovault"]["mode"] == "download_new"
    assert cfg["neurovault"]["max_connections"] == 2
    assert cfg["template"]["mask"] == "mni152_2mm"
    assert cfg["conversion"]["df"] == "n-2"
    assert cfg["qc"]["min_coverage"] == 0.4
    a = cfg["analyses"]["a"]
    assert a["meta"]["min_maps"] == 2 and a["meta"]["alpha"] == 0.05
    assert a["ica"] is None and a["default_terms"] is True and a["image_terms"] == {}


def test_shipped_configs_are_valid():
    import yaml

    for name in ("config.yaml", "demo.yaml"):
        cfg = yaml.safe_load((REPO / "config" / name).read_text())
        check_config(cfg, SCHEMA, basedir=REPO)


def mutate(fn):
    cfg = base()
    fn(cfg)
    return cfg


BROKEN = {
    "unknown key": (lambda c: c["neurovault"].update(urll="x"), "neurovault.urll", "unknown key"),
    "unknown analysis key": (
        lambda c: c["analyses"]["a"].update(image_idz=[1]),
        "analyses.a.image_idz",
        "unknown key",
    ),
    "wrong type": (lambda c: c["neurovault"].update(timeout="fast"), "neurovault.timeout", "is not of type"),
    "bad mode": (lambda c: c["neurovault"].update(mode="sometimes"), "neurovault.mode", "download_new"),
    "negative max_images": (
        lambda c: c["analyses"]["a"].update(max_images=-3),
        "analyses.a.max_images",
        "Fix: give an integer >= 1, or null",
    ),
    "unknown method": (
        lambda c: c["analyses"]["a"]["meta"].update(methods=["magic"]),
        "analyses.a.meta.methods.0",
        "stouffer",
    ),
    "unknown operator": (
        lambda c: c["analyses"].update(b={"image_terms": {"map_type": {"like": "T"}}}),
        "analyses.b.image_terms.map_type",
        "operator",
    ),
    "invalid regex": (
        lambda c: c["analyses"].update(b={"image_terms": {"name": {"pattern": "(unclosed"}}}),
        "analyses.b.image_terms.name",
        "regular expression",
    ),
    "no selection": (lambda c: c["analyses"].update(b={"meta": {}}), "analyses.b", "selects no images"),
    "missing mask": (
        lambda c: c.update(template={"mask": "/nonexistent/mask.nii.gz"}),
        "template.mask",
        "does not exist",
    ),
    "bad url": (lambda c: c["neurovault"].update(url="/nonexistent/snapshot"), "neurovault.url", "snapshot"),
    "bad analysis name": (
        lambda c: c["analyses"].update({"../evil": {"image_ids": [1]}}),
        "analyses",
        "invalid analysis name",
    ),
}


@pytest.mark.reliability
@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_config_names_key_and_fix(case):
    fn, key, words = BROKEN[case]
    with pytest.raises(ConfigError) as info:
        check_config(mutate(fn), SCHEMA)
    msg = str(info.value)
    assert key in msg, msg
    assert words.lower() in msg.lower(), msg


@pytest.mark.reliability
def test_yaml_is_loaded_safely(tmp_path):
    """A YAML tag that would construct a Python object is refused, never evaluated."""
    wf = make_workdir(tmp_path, base())
    (wf / "test.yaml").write_text(
        "analyses:\n  a:\n    image_ids: !!python/object/apply:os.system ['touch PWNED']\n"
    )
    proc = run_snakemake(wf, "-n", check=False)
    assert proc.returncode != 0
    assert not (wf / "PWNED").exists()


@pytest.mark.reliability
def test_broken_config_stops_before_any_job(tmp_path):
    cfg = mutate(BROKEN["unknown operator"][0])
    wf = make_workdir(tmp_path, cfg)
    proc = run_snakemake(wf, check=False)
    assert proc.returncode != 0
    assert "analyses.b.image_terms.map_type" in proc.stdout
    assert not (wf / "results").exists(), "a job ran although the config was broken"


def test_readme_config_reference_matches_schema():
    """README's config reference is generated from the schema and must not drift from it."""
    from nvmeta.workflow.schema_doc import END, START, render

    readme = (REPO / "README.md").read_text()
    block = readme.split(START, 1)[1].split(END, 1)[0].strip()
    assert block == render(SCHEMA).strip(), "run: python -m nvmeta.workflow.schema_doc --update README.md"
    import yaml

    schema = yaml.safe_load(SCHEMA.read_text())
    for key, node in schema["properties"].items():  # every key has a description and a default
        assert node.get("description") and "default" in node, key
        for sub, subnode in node.get("properties", {}).items():
            assert subnode.get("description") and "default" in subnode, f"{key}.{sub}"


# ----------------------------------------------------------------------------- bad input, real dry runs
def _alias_bomb(levels: int) -> str:
    """About 1 KB of YAML whose aliases expand tenfold per level inside a valid key."""
    text = "    image_terms:\n      f0:\n        in: &a0 [x, x, x, x, x, x, x, x, x, x]\n"
    for i in range(1, levels + 1):
        text += f"      f{i}:\n        in: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]\n"
    return "analyses:\n  a:\n" + text


BAD_YAML = {
    # name: (YAML text of the config, key named in the message, words of the fix)
    "numeric analysis name": ("analyses:\n  2019: {image_ids: [1]}\n", "analyses.2019", "quote"),
    "boolean analysis name": ("analyses:\n  yes: {image_ids: [1]}\n", "analyses.True", "quote"),
    "name with a trailing newline": (
        'analyses:\n  "a\\n": {image_ids: [1]}\n',
        "analyses.'a\\n'",
        "invalid analysis name",
    ),
    "300-character name": (
        f"analyses:\n  {'a' * 300}: {{image_ids: [1]}}\n",
        "analyses.'aaaa",
        "1-64 characters",
    ),
    "huge n_perm": (
        "analyses:\n  a: {image_ids: [1], meta: {methods: [permutation], n_perm: 1000000000}}\n",
        "analyses.a.meta.n_perm",
        "give an integer >= 10 and <= 100,000",
    ),
    "huge n_components": (
        "analyses:\n  a: {image_ids: [1], ica: {n_components: 100000}}\n",
        "analyses.a.ica.n_components",
        "give an integer >= 1 and <= 100",
    ),
    "huge cbma n_iters": (
        "analyses:\n  a: {image_ids: [1], cbma: {n_iters: 1000000000}}\n",
        "analyses.a.cbma.n_iters",
        "give an integer >= 1 and <= 100,000",
    ),
    "analysis given twice": (
        "analyses:\n  pain:\n    image_ids: [1]\n  other: {image_ids: [3]}\n  pain:\n    image_ids: [2]\n",
        "analyses.pain",
        "given twice in test.yaml (lines 2 and 5)",
    ),
    "design keyed by a float": (
        "conversion:\n  design_images: {990001.0: {design: one_sample}}\nanalyses:\n  a: {image_ids: [1]}\n",
        "conversion.design_images.990001.0",
        "image id",
    ),
    "override keyed by a non-id": (
        "conversion:\n  df_images: {abc: 3}\nanalyses:\n  a: {image_ids: [1]}\n",
        "conversion.df_images.abc",
        "image id",
    ),
    "YAML alias bomb": (_alias_bomb(7), "analyses.a.image_terms", "aliases"),
    "credentials in the URL": (
        "neurovault: {url: 'https://someone:s3cr3t-pw@neurovault.org/api/'}\nanalyses:\n  a: {image_ids: [1]}\n",
        "neurovault.url",
        "remove the 'user:password@' part",
    ),
    "mask among the workflow's outputs": (
        "template: {mask: results/template/mask.nii.gz}\nanalyses:\n  a: {image_ids: [1]}\n",
        "template.mask",
        "outside results/",
    ),
}


@pytest.mark.reliability
@pytest.mark.parametrize("case", sorted(BAD_YAML))
def test_bad_input_one_clear_error_before_any_job(tmp_path, case):
    """A real ``snakemake -n``: exit 1, one message naming the key and the fix, no traceback, no job."""
    text, key, fix = BAD_YAML[case]
    wf = make_workdir(tmp_path, base())
    (wf / "test.yaml").write_text(text)
    if (
        case == "mask among the workflow's outputs"
    ):  # an output of an earlier run (once: CyclicGraphException)
        (wf / "results" / "template").mkdir(parents=True)
        (wf / "results" / "template" / "mask.nii.gz").write_bytes(b"\x1f\x8b")
    proc = run_snakemake(wf, "-n", check=False, timeout=300)
    out = proc.stdout
    assert proc.returncode == 1, out[-3000:]
    assert f"config key {key}" in out, out[-3000:]
    assert "Fix:" in out and fix.lower() in out.lower(), out[-3000:]
    assert "Traceback" not in out and 'File "' not in out, out[-3000:]
    assert "Nothing was run." in out
    assert not (wf / "results" / "logs").exists()
    if case == "credentials in the URL":
        assert "s3cr3t-pw" not in out
        leaked = [
            p
            for p in wf.rglob("*")
            if p.is_file() and b"s3cr3t-pw" in p.read_bytes() and p.name != "test.yaml"
        ]
        assert not leaked, leaked


def test_config_size_is_checked_without_expanding_aliases():
    """The size bound counts shared (aliased) values without walking them once per alias."""
    import yaml

    from nvmeta.workflow.config import MAX_CONFIG_VALUES, _expanded_size

    cfg = yaml.safe_load(_alias_bomb(9))  # 10^10 values expanded: a walk would never end
    assert _expanded_size(cfg, {}) > 10**10 > MAX_CONFIG_VALUES
    ok = {"analyses": {"a": {"image_ids": list(range(1, 100_001))}}}
    assert _expanded_size(ok, {}) == 100_004
    check_config({**ok, "neurovault": {"url": "https://neurovault.org/api/"}}, SCHEMA)


def test_defaults_fill_nested_blocks():
    """Every schema default is filled, in each analysis and in its meta/ica blocks; null stays null."""
    from nvmeta.workflow.config import defaults

    cfg = base()
    cfg["analyses"]["b"] = {"collection_ids": [1425], "ica": {}, "meta": None}
    check_config(cfg, SCHEMA)
    a, b = cfg["analyses"]["a"], cfg["analyses"]["b"]
    assert a["meta"] == {**defaults("meta"), "methods": ["stouffer"]}
    assert b["ica"] == defaults("ica") and b["meta"] is None and a["ica"] is None
    for block in ("neurovault", "conversion", "qc", "template"):
        assert cfg[block] == defaults(block)
    assert {k: v for k, v in b.items() if k not in ("meta", "ica")} == {
        **{k: v for k, v in defaults("analysis").items() if k not in ("meta", "ica")},
        "collection_ids": [1425],
    }


@pytest.mark.parametrize("key", [1, 151, "151"])
def test_override_keyed_by_id_is_accepted(key):
    cfg = base()
    cfg["conversion"] = {"n_images": {key: 20}}
    assert check_config(cfg, SCHEMA)["conversion"]["n_images"] == {key: 20}


def test_validated_config_is_read_only_but_behaves_as_plain_data():
    """Consumers get a frozen view: no code can re-default or patch a validated block."""
    import copy
    import json
    import pickle

    cfg = check_config(base(), SCHEMA)
    meta = cfg["analyses"]["a"]["meta"]
    for change in (
        lambda: meta.update(alpha=0.5),
        lambda: meta.__setitem__("alpha", 0.5),
        lambda: meta.setdefault("n_jobs", 4),
        lambda: meta["methods"].append("fisher"),
        lambda: cfg["neurovault"].pop("url"),
    ):
        with pytest.raises(TypeError, match="read-only"):
            change()
    assert meta["alpha"] == 0.05 and meta["methods"] == ["stouffer"]
    # plain data for everything else: JSON, repr (Snakemake's params hashing), pickle (script jobs)
    assert json.loads(json.dumps(cfg["analyses"])) == cfg["analyses"]
    assert repr(meta) == repr(dict(meta)) and repr(meta["methods"]) == "['stouffer']"
    assert pickle.loads(pickle.dumps(meta)) == meta and copy.deepcopy(cfg["qc"]) == cfg["qc"]
    assert {**meta, "alpha": 0.01}["alpha"] == 0.01  # the way to derive a changed block


# ----------------------------------------------------------------------------- keys given twice
def _problems(tmp_path, text: str, name: str = "c.yaml") -> list[str]:
    from nvmeta.workflow.config_files import duplicate_key_problems

    path = tmp_path / name
    path.write_text(text)
    return duplicate_key_problems([path])


def test_key_given_twice_is_named_with_both_lines(tmp_path):
    """A second `pain:` under analyses silently replaced the first (PyYAML keeps the last key)."""
    text = (
        "analyses:\n"
        "  pain:\n"
        "    image_ids: [1, 2]\n"
        "    meta: {methods: [stouffer], alpha: 0.01, alpha: 0.05}\n"
        "  pain:\n"
        "    image_ids: [3]\n"
    )
    import yaml

    assert yaml.safe_load(text)["analyses"]["pain"] == {"image_ids": [3]}  # what Snakemake gets
    shown = str(tmp_path / "c.yaml")
    assert _problems(tmp_path, text) == [
        f"config key analyses.pain.meta.alpha: given twice in {shown} (lines 4 and 4); YAML would "
        "silently keep only the second. Fix: merge the two into one entry, or rename one of them.",
        f"config key analyses.pain: given twice in {shown} (lines 2 and 5); YAML would silently keep "
        "only the second. Fix: merge the two into one entry, or rename one of them.",
    ]
    # check_config stops on it before anything else, naming the key and both lines
    path = tmp_path / "c.yaml"
    with pytest.raises(ConfigError, match=r"analyses\.pain: given twice .* \(lines 2 and 5\)"):
        check_config(yaml.safe_load(text), SCHEMA, configfiles=[path])


@pytest.mark.parametrize(
    "text",
    [
        "analyses:\n  a: {image_ids: [1]}\n  b: {image_ids: [1]}\n",  # equal values, distinct keys
        "analyses:\n  a: {meta: {alpha: 0.1}}\n  b: {meta: {alpha: 0.1}}\n",  # same key, other mappings
        "base: &b {image_ids: [1], max_images: 3}\nx:\n  <<: *b\n  max_images: 5\n",  # YAML override
        "analyses:\n  a: &a {image_ids: [1]}\n  b: *a\n  c: *a\n",  # one node through aliases
        "conversion:\n  n_images: {1: 20, '1': 20}\n",  # int and str: two keys to YAML too
    ],
)
def test_distinct_keys_are_not_reported(tmp_path, text):
    assert _problems(tmp_path, text) == []


def test_equal_keys_as_yaml_reads_them(tmp_path):
    # 1 and 01 are one int key to YAML (the second silently wins): reported
    (msg,) = _problems(tmp_path, "conversion:\n  n_images:\n    1: 20\n    01: 30\n")
    assert msg.startswith("config key conversion.n_images.1: given twice") and "(lines 3 and 4)" in msg


def test_json_config_duplicates(tmp_path):
    # JSON with a tab indent is not YAML: read as JSON (Snakemake tries JSON first), no line numbers
    text = '{\n\t"analyses": {"pain": {"image_ids": [1]}, "pain": {"image_ids": [2]}}\n}\n'
    (msg,) = _problems(tmp_path, text, "c.json")
    assert msg.startswith("config key pain: given twice in one object of") and "JSON" in msg
    # JSON YAML can read keeps its lines
    (msg,) = _problems(tmp_path, '{"analyses": {"pain": {}, "pain": {}}}', "d.json")
    assert "config key analyses.pain: given twice" in msg and "(lines 1 and 1)" in msg


@pytest.mark.e2e
def test_duplicate_in_any_configfile_stops_the_dry_run(tmp_path):
    """A real `snakemake -n --configfiles a.yaml b.yaml`: the repeat in the second file is found (the
    files Snakemake loaded, workflow.configfiles), one message, no traceback, nothing run."""
    wf = make_workdir(tmp_path, base())
    (wf / "b.yaml").write_text("qc:\n  max_n: 1000\n  min_coverage: 0.2\n  max_n: 50\n")
    proc = run_snakemake(wf, "-n", "--configfiles", "test.yaml", "b.yaml", check=False, timeout=300)
    out = proc.stdout
    assert proc.returncode == 1, out[-3000:]
    assert "config key qc.max_n: given twice in b.yaml (lines 2 and 4)" in out, out[-3000:]
    assert "Traceback" not in out and "Nothing was run." in out
    assert not (wf / "results").exists()


# ----------------------------------------------------------------------------- id-keyed tables
@pytest.mark.parametrize("table", ["design_images", "design_collections"])
@pytest.mark.parametrize("key", ["abc", "-5", "990001.0", 990001.0, "0", True, " 12"])
def test_design_tables_keyed_by_ids_only(table, key):
    """design_images / design_collections accepted any key, then ignored it (the design never applied)."""
    cfg = base()
    cfg["conversion"] = {table: {key: {"design": "two_sample", "n1": 10, "n2": 12}}}
    what = "image" if table == "design_images" else "collection"
    with pytest.raises(ConfigError) as info:
        check_config(cfg, SCHEMA)
    msg = str(info.value)
    assert f"config key conversion.{table}.{key}: {key!r} is not a NeuroVault {what} id" in msg, msg
    assert "Fix: key the table by" in msg and "design: two_sample" in msg
    cfg["conversion"] = {
        table: {990001: {"design": "two_sample", "n1": 10, "n2": 12}, "12": {"design": "one_sample"}}
    }
    check_config(cfg, SCHEMA)


# ----------------------------------------------------------------------------- out of range
@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda c: c["analyses"]["a"]["meta"].update(alpha=5),
            "config key analyses.a.meta.alpha = 5 is out of range. Fix: give a number > 0 and < 1 "
            "(default: 0.05).",
        ),
        (
            lambda c: c["analyses"]["a"]["meta"].update(n_perm=5),
            "config key analyses.a.meta.n_perm = 5 is out of range. Fix: give an integer >= 10 and "
            "<= 100,000 (default: 1000).",
        ),
        (
            lambda c: c["analyses"]["a"].update(cbma={"n_iters": 10**6}),
            "config key analyses.a.cbma.n_iters = 1000000 is out of range. Fix: give an integer >= 1 "
            "and <= 100,000 (default: 5000).",
        ),
        (
            lambda c: c.update(qc={"max_abs_z": 0}),
            "config key qc.max_abs_z = 0 is out of range. Fix: give a number > 0 (default: 50).",
        ),
        (
            lambda c: c.update(conversion={"n_images": {"151": 0}}),
            "config key conversion.n_images.151 = 0 is out of range. Fix: give an integer >= 1.",
        ),
        (
            lambda c: c["analyses"]["a"].update(max_images=0),
            "config key analyses.a.max_images = 0 is out of range. Fix: give an integer >= 1, or null "
            "(default: null).",
        ),
        (
            lambda c: c["analyses"]["a"].update(ica={"tol": 1}),
            "config key analyses.a.ica.tol = 1 is out of range. Fix: give a number > 0 and <= 0.1 "
            "(default: 1e-12).",
        ),
        (
            lambda c: c["neurovault"].update(timeout="fast"),
            "config key neurovault.timeout: 'fast' is not of type 'number'. Fix: give a number > 0 "
            "(default: 30).",
        ),
        (
            lambda c: c["neurovault"].update(mode="sometimes"),
            "config key neurovault.mode: 'sometimes' is not one of ['download_new', 'overwrite', 'offline']. "
            'Fix: use one of: "download_new", "overwrite", "offline" (default: "download_new").',
        ),
    ],
)
def test_fix_says_the_allowed_values(change, message):
    """'Fix:' repeated the key's description for a value out of range instead of saying the range."""
    with pytest.raises(ConfigError) as info:
        check_config(mutate(change), SCHEMA)
    assert str(info.value) == f"invalid configuration:\n  - {message}"
