"""Logging set-up for rule scripts (one log file per job, also echoed to stderr)."""

from __future__ import annotations

import logging
import os
import sys


def job_logger(name: str, path: str | os.PathLike | None = None) -> logging.Logger:
    """Return a logger writing to ``path`` (the rule's ``log:`` file) and to stderr.

    Parameters
    ----------
    name : str
        Logger name (e.g. ``"nvmeta.download"``).
    path : path-like, optional
        Log file; created (truncated) for this job.
    """
    logger = logging.getLogger(name)
    logger.setLevel(logging.INFO)
    logger.handlers.clear()
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s")
    if path is not None:
        os.makedirs(os.path.dirname(os.fspath(path)) or ".", exist_ok=True)
        fh = logging.FileHandler(path, mode="w")
        fh.setFormatter(fmt)
        logger.addHandler(fh)
    sh = logging.StreamHandler(sys.stderr)
    sh.setFormatter(fmt)
    logger.addHandler(sh)
    logger.propagate = False
    logging.captureWarnings(True)
    return logger
