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
        "minimum",
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
        "maximum",
    ),
    "huge n_components": (
        "analyses:\n  a: {image_ids: [1], ica: {n_components: 100000}}\n",
        "analyses.a.ica.n_components",
        "maximum",
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
