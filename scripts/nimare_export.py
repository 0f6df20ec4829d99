"""Rule nimare_export: the analysis as a NIMADS studyset and a NiMARE Dataset."""

from nvmeta.cbma.export import export
from nvmeta.images.template import load_mask
from nvmeta.workflow.logs import job_logger

log = job_logger("nvmeta.cbma.export", snakemake.log[0])
export(
    snakemake.input.qc,
    snakemake.input.peaks,
    snakemake.params.results,
    snakemake.params.analysis,
    load_mask(snakemake.input.mask),
    snakemake.output.studyset,
    snakemake.output.dataset,
    log,
)
