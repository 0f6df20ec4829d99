"""A throw-away copy of the workflow, for end-to-end tests and benchmarks."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

#: The repository root (the workflow's home); valid for an editable install or a checkout.
REPO = Path(__file__).resolve().parents[2]
#: What a run needs of the repository (results/ and tests/ are left behind).
WORKFLOW_PARTS = ("Snakefile", "workflow", "scripts", "envs", "profiles", "config")


def copy_workflow(
    dest: str | os.PathLike, config: dict, config_name: str, source: str | os.PathLike | None = None
) -> Path:
    """Copy the workflow into ``dest`` and write ``config`` there as ``config_name`` (YAML).

    The default profile comes along, so runs in ``dest`` use it as a user's would. ``source``: another
    tree to copy from (an export of an older commit, for benchmarks); parts it lacks are skipped.
    """
    import yaml

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    root = REPO if source is None else Path(source)
    for name in WORKFLOW_PARTS:
        src = root / name
        if src.is_dir():
            shutil.copytree(src, dest / name, dirs_exist_ok=True)
        elif source is None or src.exists():
            shutil.copy2(src, dest / name)
    (dest / config_name).write_text(yaml.safe_dump(config, sort_keys=False))
    return dest
