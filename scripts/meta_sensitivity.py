"""Rule meta_sensitivity: overlap of the methods' thresholded maps."""

from pathlib import Path

from nvmeta.images.template import load_mask
from nvmeta.meta import sensitivity
from nvmeta.workflow.logs import job_logger

log = job_logger("nvmeta.meta", snakemake.log[0])
dirs = {Path(p).parent.name: Path(p).parent for p in snakemake.input.summaries}
sensitivity(dirs, load_mask(snakemake.input.mask), snakemake.output[0])
