"""Job bodies called from the rules' ``run:`` blocks: the per-image jobs and two light fan-ins.

Per-image jobs run thousands of times, and as ``script:`` jobs each would pay for a Python
start-up, Snakemake's script preamble and the numpy/scipy/nibabel imports, several times an
image's real work (BENCHMARKS.md, "Where the time went, and what was fixed", "Per-image jobs").
The default profile sets ``force-use-threads``, so ``run:`` jobs execute in a thread of the
Snakemake process, where nothing needs importing again.

Threads of one process share one interpreter lock, with each other and with Snakemake's
scheduler, so the z-map job's thread does not compute: :func:`zmap_job` hands the image to a warm
worker process (:mod:`nvmeta.workflow.pool`; one per core Snakemake was given, ``workflow.cores``)
and waits for its qc record, which costs the lock nothing. One Snakemake job per image all the
same: per-image outputs, logs and reruns. With one core (``--cores 1``, or a cluster job that
asked for one CPU) the work runs in the job's own thread. A download (:func:`download_job`) waits on the network, not a core: it
stays in its thread and its rule takes no core (``threads: 0``), only a connection.

The per-analysis QC table and overview page are on every run's critical path (between the last
z-map and the meta-analysis, and after the last figure) and need nothing beyond numpy and
pandas: as script jobs, starting Python would be most of their time (BENCHMARKS.md, "nvmeta vs
the stop-go recipe, side by side"). They run in-process too, and echo their records to the terminal as a
script job does (``job_log(..., echo=True)``). Their cost: Ctrl-C stops them only when they
finish (they take seconds; the heavy fan-ins, meta, figures and ICA, stay script jobs).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from nvmeta.workflow.logs import job_log


def download_job(image_id: str, output: Any, log: Any, nv_cfg: dict) -> dict:
    """Rule ``download``: metadata.json (+ map.nii.gz when the image can be had)."""
    from nvmeta.images.download import fetch_image
    from nvmeta.neurovault import make_client

    out_dir = Path(output[0]).parent
    with job_log(f"nvmeta.images.download.{image_id}", log[0]) as logger:
        return fetch_image(
            make_client(nv_cfg, log=logger),
            int(image_id),
            out_dir,
            nv_cfg["mode"],
            out_dir.parent.parent / "collections",
            log=logger,
        )


def zmap_job(  # noqa: A002
    image_id: str,
    input: Any,
    output: Any,
    log: Any,
    conversion: dict,
    limits: dict | None = None,
    workers: int = 1,
) -> dict:
    """Rule ``zmap``: t -> z, resample and mask one image onto the template grid; qc.json.

    Runs in a worker process of :mod:`nvmeta.workflow.pool` when ``workers`` (the cores Snakemake
    was given, ``workflow.cores``) is above 1, in this thread otherwise. Snakemake's IO objects are
    sent as plain strings, with this process's working directory they are relative to.
    """
    from nvmeta.workflow.pool import run_in_worker

    effect = (str(output.g), str(output.varg)) if "g" in output.keys() else None
    return run_in_worker(
        zmap_task,
        os.getcwd(),
        str(image_id),
        str(input.metadata),
        str(input.mask),
        conversion,
        (str(output.zmap), str(output.qc)),
        str(log[0]),
        limits,
        effect,
        workers=workers,
    )


def zmap_task(
    cwd: str,
    image_id: str,
    metadata: str,
    mask: str,
    conversion: dict,
    outputs: tuple[str, str],
    log: str,
    limits: dict | None,
    effect: tuple[str, str] | None,
) -> dict:
    """The z-map job's work (:func:`nvmeta.images.zmap.make_zmap`) on plain paths, in a worker or inline."""
    from nvmeta.images.template import load_mask
    from nvmeta.images.zmap import make_zmap

    if os.getcwd() != cwd:  # a worker: the paths are relative to the Snakemake process's directory
        os.chdir(cwd)
    meta_path = Path(metadata)
    with job_log(f"nvmeta.images.zmap.{image_id}", log) as logger:
        qc = make_zmap(
            meta_path,
            meta_path.with_name("map.nii.gz"),
            load_mask(mask),
            conversion,
            *outputs,
            limits,
            effect,
        )
        logger.info("image %s: %s %s", image_id, qc["status"], qc.get("reason") or "")
    return qc


def qc_job(analysis: str, input: Any, output: Any, log: Any, qc_cfg: dict) -> None:  # noqa: A002
    """Rule ``qc``: an analysis' QC table and funnel (:func:`nvmeta.images.qc.write_qc`)."""
    from nvmeta.images.qc import write_qc
    from nvmeta.images.template import load_mask

    # results/images/{id}/ of every selected image, as the rule declares its inputs
    image_dirs = {int(Path(p).parent.name): Path(p).parent for p in input.qc}
    with job_log(f"nvmeta.images.qc.{analysis}", log[0], echo=True) as logger:
        write_qc(
            input.selection,
            image_dirs.__getitem__,
            qc_cfg,
            output.qc,
            output.funnel,
            logger=logger,
            mask_img=load_mask(os.fspath(input.mask)),
            consensus_json=output.consensus,
        )


def overview_job(  # noqa: A002
    analysis: str, input: Any, output: Any, log: Any, methods: list[str], cbma_methods: list[str]
) -> None:
    """Rule ``overview``: an analysis' first page and its landing-page card (:func:`nvmeta.figures.overview.write_overview`)."""
    from nvmeta.figures.overview import write_overview

    with job_log(f"nvmeta.figures.overview.{analysis}", log[0], echo=True) as logger:
        # runs whenever the method list changes: the folders of dropped methods must not look current
        from nvmeta.workflow.stale import remove_stale_meta_outputs

        remove_stale_meta_outputs(Path(output[0]).parent, methods, logger)
        write_overview(
            output.page,
            analysis,
            {key: input[key] for key in input.keys()},
            methods,
            cbma_methods,
            card_html=output.card,
            logger=logger,
        )
