"""Outputs of fan-ins the config no longer asks for, removed so that nothing stale looks current.

Snakemake never deletes the outputs of a job that has left the DAG: after ``meta.methods: [stouffer,
fisher]`` becomes ``[stouffer]``, ``meta/fisher/`` would stay beside ``meta/stouffer/`` with its maps,
tables and figures, indistinguishable from a result of the current run. The overview job (rule
``overview``) runs whenever an analysis' method list changes (the list is one of its params), after every
fan-in of that analysis, and never in a dry run, so it does the sweep.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterable
from pathlib import Path

__all__ = ["remove_stale_meta_outputs"]


def remove_stale_meta_outputs(
    analysis_dir: str | Path, methods: Iterable[str], log: logging.Logger | logging.LoggerAdapter
) -> list[Path]:
    """Remove ``meta/<method>/`` of every registered method not in ``methods`` (and a stale sensitivity table).

    Only folders named after a method of the estimator registry are touched, so nothing else a user keeps
    under ``meta/`` is at risk. ``meta/sensitivity.tsv`` compares the methods of a run with more than one
    (rule ``meta_sensitivity``): with fewer it is no longer an output and goes too.

    Parameters
    ----------
    analysis_dir : path-like
        ``results/analyses/<analysis>``.
    methods : iterable of str
        The analysis' current ``meta.methods`` (empty when its ``meta`` block is null).
    log : logging.Logger
        The job's logger: every removal is a warning naming what went and why.

    Returns
    -------
    list of Path
        What was removed.
    """
    from nvmeta.meta.registry import ESTIMATORS

    meta_dir = Path(analysis_dir) / "meta"
    keep = list(methods)
    removed: list[Path] = []
    for name in sorted(set(ESTIMATORS) - set(keep)):
        path = meta_dir / name
        if path.is_symlink():
            path.unlink()
        elif path.is_dir():
            shutil.rmtree(path)
        else:
            continue
        removed.append(path)
        log.warning(
            "%s/ removed: method %s is no longer in this analysis' meta.methods (%s)",
            path,
            name,
            ", ".join(keep) or "meta is off",
        )
    sensitivity = meta_dir / "sensitivity.tsv"
    if len(keep) < 2 and (sensitivity.is_file() or sensitivity.is_symlink()):
        sensitivity.unlink()
        removed.append(sensitivity)
        log.warning("%s removed: it compares methods, and this analysis now runs %d", sensitivity, len(keep))
    return removed
