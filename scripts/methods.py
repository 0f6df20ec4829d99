"""Rule methods: the analysis' methods paragraph (methods.html) and its BibTeX (references.bib)."""

from nvmeta.figures.methods import methods_job
from nvmeta.workflow.logs import job_logger

log = job_logger("nvmeta.figures.methods", snakemake.log[0])
methods_job(
    snakemake.wildcards.analysis,
    {key: snakemake.input[key] for key in snakemake.input.keys()},
    snakemake.config,
    snakemake.params.methods,
    snakemake.params.cbma_methods,
    snakemake.output.html,
    snakemake.output.bib,
    logger=log,
)
