"""Rule cbma: one NiMARE CBMA estimator with Monte-Carlo FWE on an analysis' peaks."""

import logging
from pathlib import Path

from nvmeta.cbma.estimate import run_cbma
from nvmeta.images.template import load_mask
from nvmeta.workflow.logs import job_logger

log = job_logger("nvmeta.cbma", snakemake.log[0])
for handler in log.handlers:  # NiMARE's own messages go to the job's log too
    logging.getLogger("nimare").addHandler(handler)
run_cbma(
    snakemake.wildcards.cbma_method,
    snakemake.input.peaks,
    load_mask(snakemake.input.mask),
    snakemake.params.cbma,
    Path(snakemake.output.summary).parent,
    n_cores=snakemake.threads,
    log=log,
)
