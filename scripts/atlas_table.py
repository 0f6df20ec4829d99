"""Rule atlas_table: results/atlas/atlas.tsv (one row per reference map) and atlas.png."""

from nvmeta.decode.atlas import write_atlas_table
from nvmeta.workflow.logs import job_logger

log = job_logger("nvmeta.decode.atlas", snakemake.log[0])
write_atlas_table(
    snakemake.input.terms,
    list(snakemake.input.summaries),
    snakemake.output.table,
    snakemake.output.png,
    snakemake.input.funnel,
    log,
)
