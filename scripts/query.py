"""Rule query: resolve one analysis into results/analyses/{analysis}/selection.tsv."""

from nvmeta.client import make_client
from nvmeta.logs import job_logger
from nvmeta.query import run_query, write_selection

log = job_logger("nvmeta.query", snakemake.log[0])
client = make_client(snakemake.config["neurovault"])
name = snakemake.wildcards.analysis
records = run_query(client, snakemake.config["analyses"][name], log, key_prefix=f"analyses.{name}")
write_selection(records, snakemake.output[0])
log.info("selected %d images", len(records))
