"""Rule template: write the template mask (the output grid of the run)."""

from nvmeta.images.template import write_mask
from nvmeta.workflow.logs import job_logger

log = job_logger("nvmeta.images.template", snakemake.log[0])
write_mask(snakemake.params.spec, snakemake.output[0])
log.info("template %s written to %s", snakemake.params.spec, snakemake.output[0])
