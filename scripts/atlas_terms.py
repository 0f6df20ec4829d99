"""Checkpoint atlas_terms: group the atlas' included maps by term; which terms get a reference map."""

from nvmeta.decode.terms import write_terms
from nvmeta.workflow.logs import job_logger

log = job_logger("nvmeta.decode.terms", snakemake.log[0])
write_terms(
    snakemake.input.groups,
    snakemake.input.qc,
    snakemake.params.min_maps,
    snakemake.params.min_collections,
    snakemake.output.terms,
    snakemake.output.members,
    log,
)
