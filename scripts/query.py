"""Rule query: resolve one analysis into results/analyses/{analysis}/selection.tsv (+ its funnel)."""

from pathlib import Path

from nvmeta.cache import query_client
from nvmeta.logs import job_logger
from nvmeta.query import query_job

log = job_logger("nvmeta.query", snakemake.log[0])
# In offline mode with a server URL, the query reads the records of earlier downloads only.
client = query_client(snakemake.config["neurovault"], Path(snakemake.output.selection).parents[2], log)
name = snakemake.wildcards.analysis
records = query_job(
    client,
    snakemake.config["analyses"][name],
    snakemake.output.selection,
    snakemake.output.funnel,
    log,
    key_prefix=f"analyses.{name}",
)
log.info("selected %d images", len(records))
