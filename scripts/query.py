"""Rule query: resolve one analysis into results/analyses/{analysis}/selection.tsv."""

from pathlib import Path

from nvmeta.cache import offline_client
from nvmeta.client import make_client
from nvmeta.logs import job_logger
from nvmeta.query import run_query, write_selection

log = job_logger("nvmeta.query", snakemake.log[0])
nv = snakemake.config["neurovault"]
if nv["mode"] == "offline" and nv["url"].startswith(("http://", "https://")):
    # Only what is on disk: the records of earlier downloads (results/images, results/collections).
    client = offline_client(Path(snakemake.output[0]).parents[2], nv)
else:
    client = make_client(nv, log=log)
name = snakemake.wildcards.analysis
records = run_query(client, snakemake.config["analyses"][name], log, key_prefix=f"analyses.{name}")
write_selection(records, snakemake.output[0])
log.info("selected %d images", len(records))
