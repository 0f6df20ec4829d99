# Helpers shared by the rules: paths, selections read from the query checkpoint, per-image params.
# Reading this file changes nothing on disk and no process-wide state (-n, --lint and --report
# read it too).
import csv
import functools
import gc
import os
from pathlib import Path

from snakemake.exceptions import WorkflowError

from nvmeta.decode.atlas import selection_cfg as atlas_selection_cfg
from nvmeta.decode.references import leave_out_sets
from nvmeta.decode.terms import read_members
from nvmeta.select.query import analysis_query_spec, analysis_selection
from nvmeta.workflow.batches import read_plan
from nvmeta.workflow.methods import effect_methods, z_methods


# Snakemake keeps its whole DAG alive until the process ends: at 20,000 images 3.3 million
# objects tracked by the garbage collector, which CPython's collection at exit scans once more
# for a process that is ending (5.6 s at 20,000 images, 14 s at 50,000; BENCHMARKS.md, row 4).
# Once the run is over, freezing the heap (gc.freeze: out of the collector's generations) leaves
# it nothing to scan. Snakemake calls these hooks only at the end of a real run, never for -n.
onsuccess:
    gc.freeze()


onerror:
    gc.freeze()


RESULTS = "results"
IMAGES = f"{RESULTS}/images/{{image_id}}"
ANALYSIS = f"{RESULTS}/analyses/{{analysis}}"
LOGS = f"{RESULTS}/logs"
TEMPLATE_MASK = f"{RESULTS}/template/mask.nii.gz"
BATCH_PLAN = f"{RESULTS}/batches/plan.tsv"
# The image-based methods, from their registry: those reading z-maps, and those pooling per-image
# effect sizes (nvmeta.meta.effects), which read g / var(g) maps.
Z_METHODS = z_methods()
EFFECT_METHODS = effect_methods()
METHODS = Z_METHODS + EFFECT_METHODS
# The z-map job writes g / var(g) only when some analysis pools effect sizes (they cost a z -> t
# inversion per image); adding such a method therefore reruns the z-map jobs once.
EFFECT_OUTPUTS = (
    {"g": f"{IMAGES}/g.nii.gz", "varg": f"{IMAGES}/varg.nii.gz"}
    if any(
        set((spec.get("meta") or {}).get("methods", [])) & set(EFFECT_METHODS)
        for spec in config["analyses"].values()
    )
    else {}
)
# Parameters of the meta block each method depends on (so that e.g. n_perm only reruns permutation).
META_COMMON_KEYS = [
    "min_maps",
    "min_fraction",
    "alpha",
    "two_sided",
    "combine_within",
    "dependence",
    "threshold",
    "cut_coords",
    "vmax",
    "min_cluster_voxels",
    "cluster_threshold_z",
    "jackknife",
]
META_PERM_KEYS = ["n_perm", "random_state"]
META_EFFECT_KEYS = ["trim"]


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
# One z-map at a time within a batch: in profiles/slurm each z-map takes one `batch_slots` (scope
# local: per submission), and here is the one per submission. Not in the profile: Snakemake does
# not pass a profile's `resources` on to the jobs it spawns, and the job inside the allocation,
# which forms the batch again, would run its z-maps side by side and ask for one CPU each.
if "batch_slots" not in workflow.global_resources:
    workflow.register_resource("batch_slots", 1)


def analyses_with(block):
    """Names of the analyses whose config has a ``meta`` or ``ica`` block."""
    return [a for a, spec in config["analyses"].items() if spec.get(block) is not None]


def mask_input(wildcards=None):
    """The template mask as a file input when it is a path (so a changed mask file reruns)."""
    mask = config["template"]["mask"]
    return [] if mask == "mni152_2mm" else [mask]


@functools.lru_cache(maxsize=None)
def _read_selection(path, mtime_ns):
    """(image_id, collection_id) pairs of a selection.tsv; ValueError when a row is unreadable."""
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    out = []
    for line, row in enumerate(rows, start=2):
        image_id = row.get("image_id") or ""
        if not image_id.isascii() or not image_id.isdigit() or image_id.startswith("0"):
            raise ValueError(
                f"line {line}: image_id {image_id!r} is not a positive integer"
            )
        out.append((int(image_id), row.get("collection_id") or ""))
    return tuple(out)


def selection(analysis):
    """(image_id, collection_id) pairs of an analysis, once its query checkpoint has run."""
    path = checkpoints.query.get(analysis=analysis).output.selection
    try:
        return _read_selection(path, os.stat(path).st_mtime_ns)
    except (OSError, ValueError, csv.Error) as exc:
        # Never removed here: this file is read by dry runs, --lint and --report as well.
        raise WorkflowError(
            f"{path} is unreadable ({exc}): edited by hand, truncated or written by an "
            f"older nvmeta. Fix: run the same command with --forcerun {path} (its query "
            "runs again and rewrites it)."
        )


@functools.lru_cache(maxsize=4)
def _read_plan(path, mtime_ns):
    return read_plan(path)


def batch_plan_selections():
    """Every selection whose images get z-map jobs: the analyses' and the atlas' (rule batch_plan)."""
    paths = [f"{RESULTS}/analyses/{a}/selection.tsv" for a in config["analyses"]]
    if config.get("atlas") is not None:
        paths.append(f"{RESULTS}/atlas/selection.tsv")
    return paths


def batch_plan():
    """The batches of z-map jobs (rule batch_plan, a checkpoint after every query)."""
    path = checkpoints.batch_plan.get().output[0]
    return _read_plan(path, os.stat(path).st_mtime_ns)


def zmap_batch_group(wildcards):
    """``group`` of a z-map job: ``zmaps_<k>``, its batch (Snakemake uses groups in cluster runs
    and dry runs only). None (no group) while the plan is being made, which the z-map job waits
    for anyway, and for an image no analysis selected (a z-map asked for by path).
    """
    k = batch_plan().batch_of.get(int(wildcards.image_id))
    return None if k is None else f"zmaps_{k}"


def zmap_batch_inputs(wildcards):
    """qc.json of every image of batch ``wildcards.batch`` (rule zmap_batch)."""
    members = batch_plan().members
    k = int(wildcards.batch)
    if k >= len(members):
        raise WorkflowError(
            f"batch {k} does not exist: {BATCH_PLAN} has {len(members)} batches "
            f"(0 to {len(members) - 1})."
        )
    return [f"{RESULTS}/images/{i}/qc.json" for i in members[k]]


def batch_outputs(wildcards=None):
    """Input function: the table of every batch (rule zmap_batch), once the plan is made
    (apart from all_outputs, whose other targets are known before any query has run)."""
    return [f"{RESULTS}/batches/zmaps_{k}.tsv" for k in range(len(batch_plan()))]


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
    """image id -> collection id over every readable selection on disk (for per-collection overrides)."""
    out = {}
    paths = [
        Path(RESULTS) / "analyses" / a / "selection.tsv" for a in config["analyses"]
    ]
    if config.get("atlas") is not None:
        paths.insert(0, Path(RESULTS) / "atlas" / "selection.tsv")
    for path in paths:
        try:
            pairs = _read_selection(str(path), path.stat().st_mtime_ns)
        except (OSError, ValueError, csv.Error):
            continue  # missing or unreadable: selection() says how to rerun its query
        out.update(pairs)
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
        "design_images": pick(conv["design_images"], image_id),
        "design_collections": pick(conv["design_collections"], cid) if cid else {},
    }


def meta_params(wildcards):
    """The meta block keys a method depends on (adding a method does not rerun the others)."""
    meta = config["analyses"][wildcards.analysis]["meta"]
    keys = META_COMMON_KEYS + (
        META_PERM_KEYS if wildcards.method == "permutation" else []
    )
    if wildcards.method in EFFECT_METHODS:
        keys = keys + META_EFFECT_KEYS
    return {k: meta[k] for k in keys}


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
        out += [
            f"{d}/z.nii.gz",
            f"{d}/clusters.tsv",
            f"{d}/z.png",
            f"{d}/jackknife.tsv",
        ]
        if method in EFFECT_METHODS:
            out += [f"{d}/est.nii.gz", f"{d}/est.png"]
    if len(meta["methods"]) > 1:
        out.append(f"{RESULTS}/analyses/{analysis}/meta/sensitivity.tsv")
    return out


def ica_outputs(analysis):
    ica = config["analyses"][analysis]["ica"]
    d = f"{RESULTS}/analyses/{analysis}/ica"
    out = [f"{d}/components.nii.gz", f"{d}/mixing.tsv", f"{d}/terms.tsv"]
    out += [f"{d}/component_{k}.png" for k in range(ica["n_components"])]
    out.append(f"{d}/stability.tsv")
    return out


def ica_config(wildcards):
    return config["analyses"][wildcards.analysis]["ica"]


def ica_component_label(terms_tsv, k):
    """Report label of ICA component ``k``: "ICk: its top terms" (read from terms.tsv at report time)."""
    try:
        with open(terms_tsv, newline="") as fh:
            rows = [
                r
                for r in csv.DictReader(fh, delimiter="\t")
                if r["component"] == str(k)
            ]
    except (OSError, KeyError):
        rows = []
    rows.sort(key=lambda r: int(r.get("rank") or 0))
    terms = ", ".join(r["term"] for r in rows).replace("{", "").replace("}", "")
    return f"IC{k}: {terms}" if terms else f"IC{k}"


def all_outputs(wildcards):
    out = []
    for analysis, spec in config["analyses"].items():
        d = f"{RESULTS}/analyses/{analysis}"
        # query_funnel.json too: a checkpoint with an output missing (deleted, or an older
        # nvmeta's) then runs again instead of leaving its dependents unresolved
        out += [f"{d}/selection.tsv", f"{d}/query_funnel.json"]
        out += [f"{d}/qc.tsv", f"{d}/funnel.tsv"]
        out.append(f"{d}/figures/qc_consensus.png")
        out += [f"{d}/overview.html", f"{d}/methods.html", f"{d}/references.bib"]
        if spec["meta"] is not None:
            out += meta_outputs(analysis)
        if spec["ica"] is not None:
            out += ica_outputs(analysis)
        if spec.get("cbma") is not None:
            out += cbma_outputs(analysis)  # workflow/rules/cbma.smk
        if spec.get("decode") is not None:
            out += decode_outputs(analysis)  # workflow/rules/decode.smk
    return out + atlas_outputs()  # workflow/rules/atlas.smk


# --- cbma (workflow/rules/cbma.smk) ---
def cbma_config(wildcards):
    return config["analyses"][wildcards.analysis]["cbma"]


def cbma_peak_params(wildcards):
    cbma = cbma_config(wildcards)
    return {k: cbma[k] for k in CBMA_PEAK_KEYS}


def cbma_run_params(wildcards):
    cbma = cbma_config(wildcards)
    return {k: v for k, v in cbma.items() if k not in CBMA_PEAK_KEYS + ["methods"]}


def cbma_outputs(analysis):
    """Everything the cbma block of an analysis produces (for all_outputs)."""
    spec = config["analyses"][analysis]
    d = f"{RESULTS}/analyses/{analysis}"
    out = [
        f"{d}/cbma/peaks.tsv",
        f"{d}/nimare/studyset.json",
        f"{d}/nimare/dataset.pkl.gz",
    ]
    for method in spec["cbma"]["methods"]:
        out += [
            f"{d}/cbma/{method}/{name}"
            for name in ("z.nii.gz", "clusters.tsv", "z.png", "summary.json")
        ]
    if spec["meta"] is not None:
        out += [f"{d}/overlap.tsv", f"{d}/figures/ibma_vs_cbma.png"]
    return out


# --- meta job memory (workflow/rules/meta.smk) ---
#: Voxels of the default template (MNI152 2 mm brain mask): what meta_mem_mb assumes while the
#: template job has not yet written the mask (Snakemake evaluates resources again once a job's
#: inputs exist, before it runs or is submitted).
MNI152_2MM_VOXELS = 235_375


@functools.lru_cache(maxsize=8)
def _mask_voxels(path, mtime_ns):
    import nibabel as nib
    import numpy as np

    return int(np.count_nonzero(np.asarray(nib.load(path).dataobj)))


def _meta_mask_voxels(input):
    """Voxels of the template mask a meta job reads; the 2 mm template's count before the mask
    is written (the resource functions are evaluated again when the job is ready)."""
    try:
        return _mask_voxels(input.mask, os.stat(input.mask).st_mtime_ns)
    except OSError:
        return MNI152_2MM_VOXELS


def meta_mem_mb(wildcards, input):
    """``mem_mb`` of a z-method meta job. Streaming methods: 2 GB whatever the number of maps.
    Permutation: 2 GB plus the peak that :func:`nvmeta.meta.estimators.permutation_memory_bytes`
    estimates for these maps on this mask with the analysis' ``n_perm``, the same estimate with
    which the job refuses to start on a machine that has less (flat in the number of maps:
    BENCHMARKS.md, "Fan-ins at 2,000 / 5,000 / 20,000 maps").
    """
    if wildcards.method != "permutation":
        return 2000
    from nvmeta.meta.estimators import permutation_memory_bytes

    voxels = _meta_mask_voxels(input)
    n_perm = config["analyses"][wildcards.analysis]["meta"]["n_perm"]
    return 2000 + permutation_memory_bytes(len(input.zmaps), voxels, n_perm) // 2**20


def meta_runtime(wildcards, input, attempt):
    """``runtime`` (minutes) of a z-method meta job, times ``attempt`` (a retry asks more).
    Streaming methods: 10 minutes plus one per 200 maps, several times what they take
    (BENCHMARKS.md, "Fan-ins at 2,000 / 5,000 / 20,000 maps"). Permutation: what
    :func:`nvmeta.meta.estimators.permutation_runtime_minutes` declares for these maps, this mask
    and the analysis' ``n_perm`` (its time grows with all three). The SLURM profiles leave it to
    this function (a profile's expression cannot see the mask or the config)."""
    if wildcards.method != "permutation":
        return (10 + len(input.zmaps) // 200) * attempt
    from nvmeta.meta.estimators import permutation_runtime_minutes

    voxels = _meta_mask_voxels(input)
    n_perm = config["analyses"][wildcards.analysis]["meta"]["n_perm"]
    return permutation_runtime_minutes(len(input.zmaps), voxels, n_perm) * attempt


# --- overview page and methods paragraph (workflow/rules/report.smk) ---
def methods_inputs(wildcards):
    """What the methods paragraph of an analysis reads: its funnel and QC table, the summary of
    every fan-in it runs."""
    spec = config["analyses"][wildcards.analysis]
    d = f"{RESULTS}/analyses/{wildcards.analysis}"
    out = {"funnel": f"{d}/funnel.tsv", "qc": f"{d}/qc.tsv"}
    if spec["meta"] is not None:
        out["summaries"] = [
            f"{d}/meta/{m}/summary.json" for m in spec["meta"]["methods"]
        ]
    if spec.get("cbma") is not None:
        out["cbma_summaries"] = [
            f"{d}/cbma/{m}/summary.json" for m in spec["cbma"]["methods"]
        ]
    if spec["ica"] is not None:
        out["ica_summary"] = f"{d}/ica/summary.json"
    return out


def overview_inputs(wildcards):
    """What the overview page of an analysis reads: the methods paragraph's inputs, each
    result's thresholded map and figures, and the tables behind its one-line results."""
    spec = config["analyses"][wildcards.analysis]
    d = f"{RESULTS}/analyses/{wildcards.analysis}"
    out = methods_inputs(wildcards)
    if spec["meta"] is not None:
        methods = spec["meta"]["methods"]
        out["z_fdr"] = [f"{d}/meta/{m}/z_fdr.nii.gz" for m in methods]
        out["z_png"] = [f"{d}/meta/{m}/z.png" for m in methods]
        out["est_png"] = [
            f"{d}/meta/{m}/est.png" for m in methods if m in EFFECT_METHODS
        ]
        for key in ("mean_z", "coverage", "correlation"):
            out[key] = f"{d}/figures/inputs_{key}.png"
    if spec.get("cbma") is not None:
        out["cbma_png"] = [f"{d}/cbma/{m}/z.png" for m in spec["cbma"]["methods"]]
        if spec["meta"] is not None:
            out["overlap"] = f"{d}/overlap.tsv"
            out["overlap_png"] = f"{d}/figures/ibma_vs_cbma.png"
    if spec["ica"] is not None:
        out["ica_terms"] = f"{d}/ica/terms.tsv"
        out["ica_png"] = [
            f"{d}/ica/component_{k}.png" for k in range(spec["ica"]["n_components"])
        ]
        if spec["ica"]["n_runs"] > 1:
            out["ica_stability"] = f"{d}/ica/stability.tsv"
    if spec.get("decode") is not None:
        out["decoding"] = f"{d}/decode/decoding.tsv"
        out["decoding_png"] = f"{d}/decode/decoding.png"
        out["decode_summary"] = f"{d}/decode/summary.json"
    return out


# --- task atlas and decoding (workflow/rules/atlas.smk, decode.smk) ---
ATLAS = f"{RESULTS}/atlas"


def atlas_ids():
    """Image ids of the atlas' selection, once its query checkpoint has run."""
    path = checkpoints.atlas_query.get().output.selection
    try:
        return [i for i, _ in _read_selection(path, os.stat(path).st_mtime_ns)]
    except (OSError, ValueError, csv.Error) as exc:
        raise WorkflowError(
            f"{path} is unreadable ({exc}). Fix: run the same command again with "
            "--forcerun atlas_query."
        )


def atlas_per_image(pattern):
    return lambda wildcards: [pattern.format(image_id=i) for i in atlas_ids()]


@functools.lru_cache(maxsize=4)
def _atlas_members(path, mtime_ns):
    return read_members(path)


def atlas_members():
    """{slug: [(image_id, collection_id, n)]} of the eligible terms (after checkpoint atlas_terms)."""
    path = checkpoints.atlas_terms.get().output.members
    return _atlas_members(path, os.stat(path).st_mtime_ns)


def atlas_term_names():
    import pandas as pd

    path = checkpoints.atlas_terms.get().output.terms
    df = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    return dict(zip(df["slug"], df["term"]))


def atlas_outputs():
    """What the atlas block produces (for all_outputs)."""
    if config.get("atlas") is None:
        return []
    # query_funnel.json and groups.tsv too: a checkpoint with an output missing then runs again
    # instead of leaving its dependents unresolved
    names = ("selection.tsv", "query_funnel.json", "groups.tsv", "qc.tsv", "funnel.tsv")
    return [f"{ATLAS}/{name}" for name in (*names, "atlas.tsv", "atlas.png")]


def atlas_term_files(name):
    return lambda wildcards: [f"{ATLAS}/{s}/{name}" for s in sorted(atlas_members())]


#: The atlas keys a term's reference depends on (min_maps / min_collections decide which terms
#: exist, in checkpoint atlas_terms, and leave the references themselves alone).
ATLAS_TERM_KEYS = ["method", "min_fraction", "null_voxels", "random_state"]


def decode_config(wildcards):
    return config["analyses"][wildcards.analysis]["decode"]


def _left_out(analysis):
    """{slug: [image ids]} of the atlas maps an analysis' leave-out takes out of each term."""
    path = checkpoints.query.get(analysis=analysis).output[0]
    images, collections = leave_out_sets(
        path, config["analyses"][analysis]["decode"]["leave_out"]
    )
    out = {}
    for slug, members in atlas_members().items():
        gone = [m[0] for m in members if m[0] in images or m[1] in collections]
        if gone:
            out[slug] = gone
    return out


def decode_sources(analysis):
    """(name, path) of every result map an analysis decodes, in a fixed order."""
    spec = config["analyses"][analysis]
    d = f"{RESULTS}/analyses/{analysis}"
    out = [
        (f"meta/{m}", f"{d}/meta/{m}/z.nii.gz")
        for m in (spec["meta"] or {}).get("methods", [])
    ]
    out += [
        (f"cbma/{m}", f"{d}/cbma/{m}/z.nii.gz")
        for m in (spec.get("cbma") or {}).get("methods", [])
    ]
    if spec["ica"] is not None:
        out.append(("ica", f"{d}/ica/components.nii.gz"))
    return out


def decode_outputs(analysis):
    d = f"{RESULTS}/analyses/{analysis}/decode"
    return [f"{d}/decoding.tsv", f"{d}/decoding.png", f"{d}/references.tsv"]


def ica_decode_inputs(analysis):
    """Extra inputs of an ICA job whose labels come from decoding (decode block and an atlas)."""
    if (
        config["analyses"][analysis].get("decode") is None
        or config.get("atlas") is None
    ):
        return {}
    d = f"{RESULTS}/analyses/{analysis}/decode"
    return {"references": f"{d}/references.tsv", "reference_maps": f"{d}/references"}


def decode_mem_mb(wildcards, input):
    """The pool (every term's sample.npz, twice while it is read), the references over the mask
    (float32, and NiMARE's float32 copy per common mask) and a random draw's float64 sums. Before
    the samples exist this counts none of them: Snakemake evaluates resources again once a job's
    inputs exist, before it runs or is submitted."""
    pool = sum(os.path.getsize(p) for p in input.samples if os.path.exists(p))
    refs = 12 * len(input.maps) * _meta_mask_voxels(input)
    return 1500 + (2 * pool + refs) // 2**20
