"""Rule query: resolve one analysis into results/analyses/{analysis}/selection.tsv."""

from pathlib import Path

from nvmeta.cache import query_client
from nvmeta.logs import job_logger
from nvmeta.query import run_query, write_selection

log = job_logger("nvmeta.query", snakemake.log[0])
# In offline mode with a server URL, the query reads the records of earlier downloads only.
client = query_client(snakemake.config["neurovault"], Path(snakemake.output[0]).parents[2], log)
name = snakemake.wildcards.analysis
records = run_query(client, snakemake.config["analyses"][name], log, key_prefix=f"analyses.{name}")
write_selection(records, snakemake.output[0])
log.info("selected %d images", len(records))
