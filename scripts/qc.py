"""Rule qc: the per-analysis QC table and funnel."""

from pathlib import Path

from nvmeta.logs import job_logger
from nvmeta.qc import write_qc
from nvmeta.template import load_mask

logger = job_logger("nvmeta.qc", snakemake.log[0])
# results/images/{id}/ of every selected image, as the rule declares its inputs
image_dirs = {int(Path(p).parent.name): Path(p).parent for p in snakemake.input.qc}
write_qc(
    snakemake.input.selection,
    image_dirs.__getitem__,
    snakemake.params.qc,
    snakemake.output.qc,
    snakemake.output.funnel,
    logger=logger,
    mask_img=load_mask(snakemake.input.mask),
)
