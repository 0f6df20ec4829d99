"""Config checks: a broken config stops before any job with a message naming the key and the fix."""

from __future__ import annotations

import pytest
from helpers import REPO, make_workdir, run_snakemake

from nvmeta.config import check_config
from nvmeta.errors import ConfigError

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
    assert cfg["qc"]["min_coverage"] == 0.5
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
    "unknown analysis key": (lambda c: c["analyses"]["a"].update(image_idz=[1]), "analyses.a.image_idz", "unknown key"),
    "wrong type": (lambda c: c["neurovault"].update(timeout="fast"), "neurovault.timeout", "is not of type"),
    "bad mode": (lambda c: c["neurovault"].update(mode="sometimes"), "neurovault.mode", "download_new"),
    "negative max_images": (lambda c: c["analyses"]["a"].update(max_images=-3), "analyses.a.max_images", "minimum"),
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
    "bad analysis name": (lambda c: c["analyses"].update({"../evil": {"image_ids": [1]}}), "analyses", "pattern"),
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
    from nvmeta.schema_doc import END, START, render

    readme = (REPO / "README.md").read_text()
    block = readme.split(START, 1)[1].split(END, 1)[0].strip()
    assert block == render(SCHEMA).strip(), "run: python -m nvmeta.schema_doc --update README.md"
    import yaml

    schema = yaml.safe_load(SCHEMA.read_text())
    for key, node in schema["properties"].items():  # every key has a description and a default
        assert node.get("description") and "default" in node, key
        for sub, subnode in node.get("properties", {}).items():
            assert subnode.get("description") and "default" in subnode, f"{key}.{sub}"
