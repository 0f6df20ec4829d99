"""Per-image job bodies, called from the rules' ``run:`` blocks.

Per-image jobs run thousands of times. Started as ``script:`` jobs, each would pay for a Python
start-up, Snakemake's script preamble and numpy/scipy/nibabel imports (about 1 s) on top of
about 0.1-0.3 s of real work. The default and SLURM profiles set ``force-use-threads``, so
``run:`` jobs execute in a thread of the Snakemake process where those modules are already
imported; on a cluster they run inside the submitted job as usual.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from nvmeta.logs import job_log


def download_job(image_id: str, output: Any, log: Any, nv_cfg: dict) -> dict:
    """Rule ``download``: metadata.json (+ map.nii.gz when the image can be had)."""
    from nvmeta.client import make_client
    from nvmeta.download import fetch_image

    out_dir = Path(output[0]).parent
    with job_log(f"nvmeta.download.{image_id}", log[0]) as logger:
        return fetch_image(
            make_client(nv_cfg, log=logger),
            int(image_id),
            out_dir,
            nv_cfg["mode"],
            out_dir.parent.parent / "collections",
            log=logger,
        )


def zmap_job(  # noqa: A002
    image_id: str, input: Any, output: Any, log: Any, conversion: dict, limits: dict | None = None
) -> dict:
    """Rule ``zmap``: t -> z, resample and mask one image onto the template grid; qc.json."""
    from nvmeta.template import load_mask
    from nvmeta.zmap import make_zmap

    meta_path = Path(input.metadata)
    with job_log(f"nvmeta.zmap.{image_id}", log[0]) as logger:
        qc = make_zmap(
            meta_path,
            meta_path.with_name("map.nii.gz"),
            load_mask(os.fspath(input.mask)),
            conversion,
            output.zmap,
            output.qc,
            limits,
            (output.g, output.varg) if "g" in output.keys() else None,
        )
        logger.info("image %s: %s %s", image_id, qc["status"], qc.get("reason") or "")
    return qc
