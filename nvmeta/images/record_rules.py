"""QC rules on an image's NeuroVault record: maps that are not task contrasts, by name and file name.

Peraza et al. 2025 (NBCLab/large-scale-ibma, ``outlier.py``) and the OHBM 2025 NeuroVault IBMA
tutorial drop maps whose *name* contains ica, pca, ppi, seed, functional connectivity or
correlation, and whose *file name* contains ``cope`` without ``zstat``/``tstat``, or ``tfce``.
Their test is a substring test ("lexical decision" and "physical pain" contain "ica"); here every
term is a regular expression (``qc.exclude_names``, ``qc.exclude_files``), by default anchored at
letter boundaries, so that a whole word is matched. A group-labelled map with
``number_of_subjects == 1`` is a single-subject map (``qc.exclude_single_subject``).

:func:`record_reason` gives the exclusion reason of one selection row (or None);
:func:`pattern_problems` checks the configured expressions once, before any job.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Mapping
from typing import Any

#: Reason prefixes (the funnel groups reasons by them; see :func:`nvmeta.images.qc.reason_key`).
R_NAME = "not a task contrast: name matches qc.exclude_names.{key}"
R_FILE = "not a task contrast: file name matches qc.exclude_files.{key}"
R_SINGLE = "single-subject map labelled group: number_of_subjects = 1"
#: Longest name or file name quoted in a reason.
QUOTE_CHARS = 80


@functools.lru_cache(maxsize=256)
def _compile(pattern: str) -> re.Pattern:
    return re.compile(pattern, re.IGNORECASE)


def _entries(table: Mapping[str, Any] | None) -> Iterable[tuple[str, list[str]]]:
    for key, patterns in (table or {}).items():
        if patterns:
            yield str(key), [str(p) for p in patterns]


def _match(text: str, table: Mapping[str, Any] | None) -> str | None:
    """The key of the first entry of ``table`` with a pattern found in ``text`` (None: no match)."""
    if not text:
        return None
    for key, patterns in _entries(table):
        if any(_compile(p).search(text) for p in patterns):
            return key
    return None


def _quote(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= QUOTE_CHARS else text[: QUOTE_CHARS - 3] + "..."


def file_name(url: str | None) -> str:
    """The last part of a NeuroVault ``file`` URL (``.../1425/pain_01.nidm/TStatistic.nii.gz`` -> ``TStatistic.nii.gz``)."""
    if not url:
        return ""
    return str(url).split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1]


def _number(x: Any) -> float | None:
    try:
        return float(x) if x not in (None, "") else None
    except (TypeError, ValueError):
        return None


def record_reason(rec: Mapping[str, Any], qc_cfg: Mapping[str, Any]) -> str | None:
    """Why a selected image is not a task contrast, from its selection row; None when it may be one.

    Parameters
    ----------
    rec : mapping
        One row of ``selection.tsv`` (``name``, ``file``, ``analysis_level``, ``number_of_subjects``).
    qc_cfg : mapping
        ``config["qc"]``: ``exclude_names``, ``exclude_files``, ``exclude_single_subject``.

    Returns
    -------
    str or None
        ``'not a task contrast: name matches qc.exclude_names.ppi ("PPI amygdala")'``,
        ``'not a task contrast: file name matches qc.exclude_files.cope ("cope1.nii.gz")'``,
        ``"single-subject map labelled group: number_of_subjects = 1"``, or None.
    """
    name = str(rec.get("name") or "")
    key = _match(name, qc_cfg.get("exclude_names"))
    if key is not None:
        return f'{R_NAME.format(key=key)} ("{_quote(name)}")'
    fname = file_name(rec.get("file"))
    key = _match(fname, qc_cfg.get("exclude_files"))
    if key is not None:
        return f'{R_FILE.format(key=key)} ("{_quote(fname)}")'
    level = str(rec.get("analysis_level") or "").strip().lower()
    if qc_cfg.get("exclude_single_subject") and level in ("", "group"):
        if _number(rec.get("number_of_subjects")) == 1:
            return R_SINGLE
    return None


def pattern_problems(qc_cfg: Mapping[str, Any]) -> list[str]:
    """One message per configured expression that Python's ``re`` cannot compile (config check)."""
    problems = []
    for block in ("exclude_names", "exclude_files"):
        for key, patterns in _entries(qc_cfg.get(block)):
            for pattern in patterns:
                try:
                    re.compile(pattern, re.IGNORECASE)
                except re.error as exc:
                    problems.append(
                        f"config key qc.{block}.{key}: {pattern!r} is not a regular expression ({exc}). "
                        "Fix: write a Python re pattern (escape literal brackets and parentheses with \\)."
                    )
    return problems
