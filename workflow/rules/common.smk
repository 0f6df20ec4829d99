# Helpers shared by the rules: paths, selections read from the query checkpoint, per-image params.
import csv
import functools
import json
import os
from pathlib import Path

from nvmeta.query import analysis_query_spec

RESULTS = "results"
IMAGES = f"{RESULTS}/images/{{image_id}}"
ANALYSIS = f"{RESULTS}/analyses/{{analysis}}"
LOGS = f"{RESULTS}/logs"
TEMPLATE_MASK = f"{RESULTS}/template/mask.nii.gz"
METHODS = ["stouffer", "weighted_stouffer", "fisher", "ttest", "permutation"]
# Parameters of the meta block each method depends on (so that e.g. n_perm only reruns permutation).
META_COMMON_KEYS = [
    "min_maps",
    "min_fraction",
    "alpha",
    "two_sided",
    "combine_within",
    "threshold",
    "cut_coords",
    "vmax",
    "min_cluster_voxels",
]
META_PERM_KEYS = ["n_perm", "random_state"]


wildcard_constraints:
    image_id=r"[1-9][0-9]*",
    analysis=r"[A-Za-z0-9][A-Za-z0-9_-]*",
    method="|".join(METHODS),


# Bound on concurrent connections to NeuroVault across parallel jobs: every rule that talks to
# the server takes one unit of this resource. --resources nv_connections=N on the CLI wins.
if "nv_connections" not in workflow.global_resources:
    workflow.register_resource(
        "nv_connections", config["neurovault"]["max_connections"]
    )


def analyses_with(block):
    """Names of the analyses whose config has a ``meta`` or ``ica`` block."""
    return [a for a, spec in config["analyses"].items() if spec.get(block) is not None]


def mask_input(wildcards=None):
    """The template mask as a file input when it is a path (so a changed mask file reruns)."""
    mask = config["template"]["mask"]
    return [] if mask == "mni152_2mm" else [mask]


@functools.lru_cache(maxsize=None)
def _read_selection(path, mtime_ns):
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    return tuple((int(r["image_id"]), r.get("collection_id") or "") for r in rows)


def selection(analysis):
    """(image_id, collection_id) pairs of an analysis, once its query checkpoint has run."""
    path = checkpoints.query.get(analysis=analysis).output[0]
    return _read_selection(path, os.stat(path).st_mtime_ns)


def selected_ids(analysis):
    return [i for i, _ in selection(analysis)]


def per_image(pattern, analysis=None):
    """Input function: ``pattern`` (with {image_id}) for every image an analysis selected
    (the ``analysis`` wildcard, or the fixed ``analysis`` given)."""

    def inner(wildcards):
        name = analysis or wildcards.analysis
        return [pattern.format(image_id=i) for i in selected_ids(name)]

    return inner


def _collection_of():
    """image id -> collection id over every selection on disk (for per-collection overrides)."""
    out = {}
    for analysis in config["analyses"]:
        path = Path(RESULTS) / "analyses" / analysis / "selection.tsv"
        if path.exists():
            for image_id, cid in _read_selection(str(path), path.stat().st_mtime_ns):
                out[image_id] = cid
    return out


_COLLECTIONS = {}


def conversion_params(wildcards):
    """Conversion settings that apply to one image: the df rule and only *its* overrides,
    so that an override for another image does not rerun this one."""
    conv = config["conversion"]
    image_id = int(wildcards.image_id)
    if image_id not in _COLLECTIONS:
        _COLLECTIONS.update(_collection_of())
    cid = _COLLECTIONS.get(image_id, "")

    def pick(table, key):
        value = table.get(str(key), table.get(int(key)) if str(key).isdigit() else None)
        return {} if value is None else {str(key): value}

    return {
        "df": conv["df"],
        "df_images": pick(conv["df_images"], image_id),
        "n_images": pick(conv["n_images"], image_id),
        "df_collections": pick(conv["df_collections"], cid) if cid else {},
        "n_collections": pick(conv["n_collections"], cid) if cid else {},
    }


def meta_params(wildcards):
    """The meta block keys a method depends on (adding a method does not rerun the others)."""
    meta = config["analyses"][wildcards.analysis]["meta"]
    keys = META_COMMON_KEYS + (
        META_PERM_KEYS if wildcards.method == "permutation" else []
    )
    return {k: meta[k] for k in keys}


def n_selected(wildcards):
    return len(selected_ids(wildcards.analysis))


def meta_outputs(analysis):
    meta = config["analyses"][analysis]["meta"]
    fig = f"{RESULTS}/analyses/{analysis}/figures"
    out = [
        f"{fig}/{name}"
        for name in (
            "inputs.tsv",
            "inputs_mean_z.png",
            "inputs_coverage.png",
            "inputs_correlation.png",
            "inputs_glass_brain.png",
        )
    ]
    for method in meta["methods"]:
        d = f"{RESULTS}/analyses/{analysis}/meta/{method}"
        out += [f"{d}/z.nii.gz", f"{d}/clusters.tsv", f"{d}/z.png"]
    if len(meta["methods"]) > 1:
        out.append(f"{RESULTS}/analyses/{analysis}/meta/sensitivity.tsv")
    return out


def ica_outputs(analysis):
    ica = config["analyses"][analysis]["ica"]
    d = f"{RESULTS}/analyses/{analysis}/ica"
    out = [f"{d}/components.nii.gz", f"{d}/mixing.tsv", f"{d}/terms.tsv"]
    out += [f"{d}/component_{k}.png" for k in range(ica["n_components"])]
    if ica["n_runs"] > 1:
        out.append(f"{d}/stability.tsv")
    return out


def all_outputs(wildcards):
    out = []
    for analysis, spec in config["analyses"].items():
        d = f"{RESULTS}/analyses/{analysis}"
        out += [f"{d}/selection.tsv", f"{d}/qc.tsv", f"{d}/funnel.tsv"]
        out.append(f"{d}/overview.html")
        if spec["meta"] is not None:
            out += meta_outputs(analysis)
        if spec["ica"] is not None:
            out += ica_outputs(analysis)
    return out
