# Paths, config-derived constants, selection readers and helpers that several stages' rules use.
# The input, params and resource functions of one stage are in workflow/rules/helpers/<stage>.smk,
# which that stage's rule file includes first; all share one namespace, hence the names defined here.
# Reading these files changes nothing on disk and no process-wide state (-n, --lint and --report
# read them too).
import csv
import functools
import gc
import os

from snakemake.exceptions import WorkflowError

from nvmeta.decode.terms import read_members
from nvmeta.workflow.batches import read_plan
from nvmeta.workflow.methods import effect_methods, z_methods


# Snakemake keeps its whole DAG alive until the process ends, and CPython's collection at exit
# scans it once more for a process that is ending (BENCHMARKS.md, "Where the time went, and what
# was fixed", "DAG at 20,000–50,000 images"). Freezing the heap (gc.freeze: out of the collector's
# generations) once the run is over leaves it nothing to scan. Snakemake calls these hooks only at
# the end of a real run, never for -n.
onsuccess:
    gc.freeze()


onerror:
    gc.freeze()


RESULTS = "results"
IMAGES = f"{RESULTS}/images/{{image_id}}"
ANALYSIS = f"{RESULTS}/analyses/{{analysis}}"
ATLAS = f"{RESULTS}/atlas"
LOGS = f"{RESULTS}/logs"
TEMPLATE_MASK = f"{RESULTS}/template/mask.nii.gz"
BATCH_PLAN = f"{RESULTS}/batches/plan.tsv"
# The image-based methods, from their registry: those reading z-maps, and those pooling per-image
# effect sizes (nvmeta.meta.effects), which read g / var(g) maps.
Z_METHODS = z_methods()
EFFECT_METHODS = effect_methods()
METHODS = Z_METHODS + EFFECT_METHODS


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


# --- selections (checkpoint query) and the images they name ---
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


def selected_ids(analysis):
    return [i for i, _ in selection(analysis)]


def per_image(pattern, analysis=None):
    """Input function: ``pattern`` (with {image_id}) for every image an analysis selected
    (the ``analysis`` wildcard, or the fixed ``analysis`` given)."""

    def inner(wildcards):
        name = analysis or wildcards.analysis
        return [pattern.format(image_id=i) for i in selected_ids(name)]

    return inner


# --- the batch plan (checkpoint batch_plan): the z-map jobs' groups and the batch tables ---
@functools.lru_cache(maxsize=4)
def _read_plan(path, mtime_ns):
    return read_plan(path)


def batch_plan():
    """The batches of z-map jobs (checkpoint batch_plan, which runs after every query)."""
    path = checkpoints.batch_plan.get().output[0]
    return _read_plan(path, os.stat(path).st_mtime_ns)


# --- the template mask's size (meta and decode jobs' memory) ---
#: Voxels of the default template (MNI152 2 mm brain mask): what a job's resources assume while the
#: template job has not yet written the mask (Snakemake evaluates resources again once a job's
#: inputs exist, before it runs or is submitted).
MNI152_2MM_VOXELS = 235_375


@functools.lru_cache(maxsize=8)
def _mask_voxels(path, mtime_ns):
    import nibabel as nib
    import numpy as np

    return int(np.count_nonzero(np.asarray(nib.load(path).dataobj)))


def template_mask_voxels(input):
    """Voxels of the template mask a job reads (``input.mask``); the 2 mm template's count before
    the mask is written (the resource functions are evaluated again when the job is ready).
    """
    try:
        return _mask_voxels(input.mask, os.stat(input.mask).st_mtime_ns)
    except OSError:
        return MNI152_2MM_VOXELS


# --- the task atlas' terms (atlas and decode rules) ---
@functools.lru_cache(maxsize=4)
def _atlas_members(path, mtime_ns):
    return read_members(path)


def atlas_members():
    """{slug: [(image_id, collection_id, n)]} of the eligible terms (after checkpoint atlas_terms)."""
    path = checkpoints.atlas_terms.get().output.members
    return _atlas_members(path, os.stat(path).st_mtime_ns)


def atlas_term_files(name):
    return lambda wildcards: [f"{ATLAS}/{s}/{name}" for s in sorted(atlas_members())]


# --- the targets of the Snakefile's rule all ---
def all_outputs(wildcards):
    """Every result of every analysis and of the atlas; each block's own list is in its stage's
    helpers (helpers/meta.smk, ica.smk, cbma.smk, decode.smk, atlas.smk)."""
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
            out += cbma_outputs(analysis)
        if spec.get("decode") is not None:
            out += decode_outputs(analysis)
    return out + atlas_outputs()
