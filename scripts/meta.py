"""Rule meta: one meta-analysis method over an analysis' included z-maps."""

from pathlib import Path

from nvmeta.logs import job_logger
from nvmeta.meta import run_method
from nvmeta.template import load_mask

log = job_logger("nvmeta.meta", snakemake.log[0])
images = Path(snakemake.input.qc).parents[2] / "images"
cfg = dict(snakemake.params.meta, threads=snakemake.threads)
run_method(
    snakemake.wildcards.method,
    snakemake.input.qc,
    lambda image_id: images / str(image_id) / "zmap.nii.gz",
    load_mask(snakemake.input.mask),
    cfg,
    Path(snakemake.output.z).parent,
    log,
)
