"""Rule query: resolve one analysis into results/analyses/{analysis}/selection.tsv (+ its funnel)."""

from pathlib import Path

from nvmeta.neurovault.cache import query_client
from nvmeta.select.hygiene import with_hygiene
from nvmeta.select.query import query_job
from nvmeta.workflow.logs import job_logger

log = job_logger("nvmeta.select.query", snakemake.log[0])
results = Path(snakemake.output.selection).parents[2]
name = snakemake.wildcards.analysis
analysis = snakemake.config["analyses"][name]
if analysis.get("hygiene"):  # the atlas' hygiene terms under the analysis' own (nvmeta/select/hygiene.py)
    analysis = with_hygiene(analysis)
# The dump when neurovault.dump is set; in offline mode with a server URL, the records of earlier
# downloads; else the API (or a snapshot directory).
client = query_client(snakemake.config["neurovault"], results, log, analysis)
records = query_job(
    client,
    analysis,
    snakemake.output.selection,
    snakemake.output.funnel,
    log,
    key_prefix=f"analyses.{name}",
    records_dir=results / "records",
    collections_dir=results / "collections",
)
log.info("selected %d images", len(records))
