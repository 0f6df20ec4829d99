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
    logger = _fresh_logger(name, path)
    sh = logging.StreamHandler(sys.stderr)
    sh.setFormatter(_FORMAT)
    logger.addHandler(sh)
    logging.captureWarnings(True)
    return logger


_FORMAT = logging.Formatter("%(asctime)s %(levelname)s %(message)s")


def _fresh_logger(name: str, path: str | os.PathLike | None) -> logging.Logger:
    """Logger ``name`` with no handler but a file handler on ``path`` (truncated), not propagating."""
    logger = logging.getLogger(name)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    logger.handlers.clear()
    if path is not None:
        os.makedirs(os.path.dirname(os.fspath(path)) or ".", exist_ok=True)
        fh = logging.FileHandler(path, mode="w")
        fh.setFormatter(_FORMAT)
        logger.addHandler(fh)
    return logger


class job_log:  # noqa: N801 - used as a context manager, reads like a function
    """Context manager: a logger private to one job, writing to its log file, closed on exit.

    Per-image jobs run in threads of the Snakemake process (``force-use-threads``), so each
    needs its own logger name and must close its file handle (thousands of jobs per run).
    """

    def __init__(self, name: str, path: str | os.PathLike | None) -> None:
        self.name = name
        self.path = path

    def __enter__(self) -> logging.Logger:
        self.logger = _fresh_logger(self.name, self.path)
        return self.logger

    def __exit__(self, *exc) -> None:
        for handler in list(self.logger.handlers):
            handler.close()
            self.logger.removeHandler(handler)
        # Forget the logger: one per image would otherwise accumulate in logging's registry.
        logging.Logger.manager.loggerDict.pop(self.name, None)
