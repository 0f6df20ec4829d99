"""Rule nimare_export: the analysis as a NIMADS studyset and a NiMARE Dataset."""

from nvmeta.logs import job_logger
from nvmeta.nimare_export import export
from nvmeta.template import load_mask

log = job_logger("nvmeta.nimare_export", snakemake.log[0])
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
