"""Rule qc: the per-analysis QC table and funnel."""

from pathlib import Path

from nvmeta.logs import job_logger
from nvmeta.qc import write_qc
from nvmeta.template import load_mask

log = job_logger("nvmeta.qc", snakemake.log[0])
images = Path(snakemake.input.selection).parents[2] / "images"
write_qc(
    snakemake.input.selection,
    lambda image_id: images / str(image_id),
    snakemake.params.qc,
    snakemake.output.qc,
    snakemake.output.funnel,
    log=log,
    mask_img=load_mask(snakemake.input.mask),
)
