"""Rule template: write the template mask (the output grid of the run)."""

from nvmeta.logs import job_logger
from nvmeta.template import write_mask

log = job_logger("nvmeta.template", snakemake.log[0])
write_mask(snakemake.params.spec, snakemake.output[0])
log.info("template %s written to %s", snakemake.params.spec, snakemake.output[0])
