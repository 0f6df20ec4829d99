# Helpers shared by the rules: paths, selections read from the query checkpoint, per-image params.
# Reading this file changes nothing on disk and no process-wide state (-n, --lint and --report
# read it too).
import csv
import functools
import gc
import os
from pathlib import Path

from snakemake.exceptions import WorkflowError

from nvmeta.select.query import analysis_query_spec
from nvmeta.workflow.batches import read_plan


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
METHODS = ["stouffer", "weighted_stouffer", "fisher", "ttest", "permutation"]
Z_METHODS = list(METHODS)
# Methods pooling per-image effect sizes (nvmeta.meta.effects): they read g / var(g) maps.
EFFECT_METHODS = [
    "dersimonian_laird",
    "hedges",
    "fixed_effects_hedges",
    "median",
    "trimmed_mean",
]
METHODS += EFFECT_METHODS
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
    for analysis in config["analyses"]:
        path = Path(RESULTS) / "analyses" / analysis / "selection.tsv"
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
    if ica["n_runs"] > 1:
        out.append(f"{d}/stability.tsv")
    return out


def all_outputs(wildcards):
    out = []
    for analysis, spec in config["analyses"].items():
        d = f"{RESULTS}/analyses/{analysis}"
        # query_funnel.json too: a checkpoint with an output missing (deleted, or an older
        # nvmeta's) then runs again instead of leaving its dependents unresolved
        out += [f"{d}/selection.tsv", f"{d}/query_funnel.json"]
        out += [f"{d}/qc.tsv", f"{d}/funnel.tsv"]
        out.append(f"{d}/overview.html")
        if spec["meta"] is not None:
            out += meta_outputs(analysis)
        if spec["ica"] is not None:
            out += ica_outputs(analysis)
        if spec.get("cbma") is not None:
            out += cbma_outputs(analysis)  # workflow/rules/cbma.smk
    return out


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
    which the job refuses to start on a machine that has less (about 1.2 GB on the 2 mm mask
    whatever the number of maps; measured: BENCHMARKS.md, issue 12).
    """
    if wildcards.method != "permutation":
        return 2000
    from nvmeta.meta.estimators import permutation_memory_bytes

    voxels = _meta_mask_voxels(input)
    n_perm = config["analyses"][wildcards.analysis]["meta"]["n_perm"]
    return 2000 + permutation_memory_bytes(len(input.zmaps), voxels, n_perm) // 2**20


def meta_runtime(wildcards, input, attempt):
    """``runtime`` (minutes) of a z-method meta job, times ``attempt`` (a retry asks more).
    Streaming methods: 10 minutes plus one per 200 maps (110 at 20,000 maps, which took 4 to 11
    minutes; BENCHMARKS.md, issue 12). Permutation: what
    :func:`nvmeta.meta.estimators.permutation_runtime_minutes` declares for these maps, this mask
    and the analysis' ``n_perm`` (its time grows with all three). The SLURM profiles leave it to
    this function (a profile's expression cannot see the mask or the config)."""
    if wildcards.method != "permutation":
        return (10 + len(input.zmaps) // 200) * attempt
    from nvmeta.meta.estimators import permutation_runtime_minutes

    voxels = _meta_mask_voxels(input)
    n_perm = config["analyses"][wildcards.analysis]["meta"]["n_perm"]
    return permutation_runtime_minutes(len(input.zmaps), voxels, n_perm) * attempt


# --- overview page (workflow/rules/report.smk) ---
def overview_inputs(wildcards):
    """What the overview page of an analysis reads: its funnel and QC table, and the outputs of
    the fan-ins the analysis runs."""
    spec = config["analyses"][wildcards.analysis]
    d = f"{RESULTS}/analyses/{wildcards.analysis}"
    out = {"funnel": f"{d}/funnel.tsv", "qc": f"{d}/qc.tsv"}
    if spec["meta"] is not None:
        methods = spec["meta"]["methods"]
        out["summaries"] = [f"{d}/meta/{m}/summary.json" for m in methods]
        out["z_fdr"] = [f"{d}/meta/{m}/z_fdr.nii.gz" for m in methods]
        out["z_png"] = [f"{d}/meta/{m}/z.png" for m in methods]
        out["mean_z"] = f"{d}/figures/inputs_mean_z.png"
        out["coverage"] = f"{d}/figures/inputs_coverage.png"
    if spec["ica"] is not None:
        out["ica_terms"] = f"{d}/ica/terms.tsv"
        out["ica_png"] = [
            f"{d}/ica/component_{k}.png" for k in range(spec["ica"]["n_components"])
        ]
    return out
