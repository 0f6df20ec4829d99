"""Rule qc_figure: each map's correlation with the analysis' consensus, with the QC thresholds."""

from nvmeta.figures.qc import plot_consensus
from nvmeta.workflow.logs import job_logger

log = job_logger("nvmeta.figures.qc", snakemake.log[0])
plot_consensus(
    snakemake.input.qc,
    snakemake.input.consensus,
    snakemake.output[0],
    snakemake.wildcards.analysis,
    logger=log,
)
