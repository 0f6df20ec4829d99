"""Batches of per-image z-map jobs: one cluster submission per batch, from public Snakemake rules.

Snakemake submits a *connected* set of jobs that share a group id as one group job, i.e. one
``sbatch`` (Snakemake's documentation, "Defining groups for execution"). The z-map jobs of one
image each are not connected to each other, so the workflow connects them
(``workflow/rules/batches.smk``):

* once every query has run, the plan (checkpoint ``batch_plan``, :func:`plan_job`) cuts the images
  selected by all analyses, sorted by id, into runs of ``size`` (:func:`plan_batches`) and writes
  ``results/batches/plan.tsv``; every z-map job waits for it (an ``ancient`` input: the order
  only, a new plan reruns no z-map) and joins group ``zmaps_<k>`` of its batch;
* one cheap job per batch (rule ``zmap_batch``) reads the batch's ``qc.json`` files and writes the
  batch table (:func:`write_batch_table`), in the same group.

Every batch is then one connected component: N z-map jobs reach the cluster as ceil(N / size)
submissions, each job in exactly one. A rerun submits, per batch, only the jobs that have to run
(Snakemake puts only those in a group job).

Hand-written because Snakemake's own ``--group-components`` merges the group objects it keeps
cached in place each time it re-forms groups, which a workflow with checkpoints does several times
per run: batches would grow beyond their size and z-map jobs be submitted twice. Groups made of
connected jobs are formed afresh by Snakemake each time, the same way.

Sorting by id keeps batches stable as NeuroVault grows (new images get higher ids and join the
last batch); an image added in the middle of the ids shifts the batches after it, whose batch jobs
then run again (one short job each; their z-maps do not).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from nvmeta.io import atomic_path, read_json
from nvmeta.workflow.logs import job_log

__all__ = ["BatchPlan", "batch_job", "plan_batches", "plan_job", "read_plan", "write_batch_table"]

#: Columns of a batch table, one row per image of the batch.
COLUMNS = ("image_id", "status", "reason")
#: Columns of the plan, one row per selected image.
PLAN_COLUMNS = ("image_id", "batch")


@dataclass(frozen=True)
class BatchPlan:
    """Which batch each image's z-map job belongs to.

    Attributes
    ----------
    members : tuple of tuple of int
        Image ids of batch 0, 1, ... (ascending ids, ``size`` per batch, the last one the rest).
    batch_of : dict
        Image id -> batch index.
    """

    members: tuple[tuple[int, ...], ...]
    batch_of: dict[int, int]

    def __len__(self) -> int:
        return len(self.members)


def plan_batches(image_ids: Iterable[int], size: int) -> BatchPlan:
    """Cut the distinct ``image_ids``, sorted ascending, into consecutive batches of ``size``.

    Parameters
    ----------
    image_ids : iterable of int
        Ids of every selected image (duplicates across analyses allowed).
    size : int
        Z-map jobs per batch (at least 1).

    Returns
    -------
    BatchPlan
        ceil(N / size) batches for N distinct ids.
    """
    if size < 1:
        raise ValueError(f"batch size must be at least 1, got {size}")
    ids = sorted(set(image_ids))
    members = tuple(tuple(ids[start : start + size]) for start in range(0, len(ids), size))
    assert len(members) == math.ceil(len(ids) / size)
    return BatchPlan(members, {i: k for k, batch in enumerate(members) for i in batch})


def plan_job(selections: Sequence[str], size: int, out: str, log: str) -> BatchPlan:
    """Checkpoint ``batch_plan``: the batches over every analysis' ``selection.tsv``, written as
    ``results/batches/plan.tsv`` (``image_id``, ``batch``; ids ascending)."""
    from nvmeta.select.query import read_selection_ids

    with job_log("nvmeta.workflow.batches.plan", log) as logger:
        plan = plan_batches((i for path in selections for i in read_selection_ids(path)), size)
        with atomic_path(out) as tmp:
            rows = [PLAN_COLUMNS, *((i, k) for k, batch in enumerate(plan.members) for i in batch)]
            tmp.write_text("".join(f"{a}\t{b}\n" for a, b in rows))
        logger.info("%d images in %d batches of at most %d z-maps", len(plan.batch_of), len(plan), size)
    return plan


def read_plan(path: str | os.PathLike) -> BatchPlan:
    """The :class:`BatchPlan` that :func:`plan_job` wrote."""
    with open(path) as fh:
        header = tuple(next(fh).rstrip("\n").split("\t"))
        if header != PLAN_COLUMNS:
            raise ValueError(f"{path}: header {header}, expected {PLAN_COLUMNS}")
        pairs = [tuple(map(int, line.split("\t"))) for line in fh if line.strip()]
    members: list[list[int]] = []
    for image_id, k in pairs:
        if k == len(members):
            members.append([])
        elif k != len(members) - 1:
            raise ValueError(f"{path}: batch {k} of image {image_id} out of order")
        members[k].append(image_id)
    return BatchPlan(tuple(map(tuple, members)), {i: k for i, k in pairs})


def write_batch_table(qc_paths: Sequence[str | os.PathLike], out: str | os.PathLike) -> None:
    """Rule ``zmap_batch``: the batch's images and the outcome of each z-map, as a TSV.

    Parameters
    ----------
    qc_paths : sequence of path-like
        ``results/images/<id>/qc.json`` of every image of the batch (the rule's input).
    out : path-like
        ``results/batches/zmaps_<k>.tsv``: ``image_id``, ``status`` (included/excluded) and
        ``reason`` per image, in id order.
    """
    rows = []
    for path in qc_paths:
        qc = read_json(path)
        reason = str(qc.get("reason") or "").replace("\t", " ").replace("\n", " ")
        rows.append((int(Path(path).parent.name), str(qc["status"]), reason))
    rows.sort()
    with atomic_path(out) as tmp:
        tmp.write_text("".join("\t".join(map(str, row)) + "\n" for row in [COLUMNS, *rows]))


def batch_job(batch: str, qc_paths: Sequence[str], out: str, log: str) -> None:
    """Rule ``zmap_batch``: :func:`write_batch_table`, with the job's log."""
    with job_log(f"nvmeta.workflow.batches.{batch}", log) as logger:
        write_batch_table(qc_paths, out)
        logger.info("batch %s: %d z-maps", batch, len(qc_paths))
