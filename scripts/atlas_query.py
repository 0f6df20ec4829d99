"""Checkpoint atlas_query: the atlas' selection (results/atlas/selection.tsv, its funnel) and each map's term."""

from pathlib import Path

from nvmeta.decode.atlas import selection_cfg
from nvmeta.decode.terms import write_groups
from nvmeta.neurovault.cache import query_client
from nvmeta.select.query import query_job
from nvmeta.workflow.logs import job_logger

log = job_logger("nvmeta.decode.atlas", snakemake.log[0])
results = Path(snakemake.output.selection).parents[1]
atlas = snakemake.config["atlas"]
cfg = selection_cfg(atlas)
# the same sources and the same query as the analyses' (query.py): dump, offline cache or API
client = query_client(snakemake.config["neurovault"], results, log, cfg)
records = query_job(
    client,
    cfg,
    snakemake.output.selection,
    snakemake.output.funnel,
    log,
    key_prefix="atlas",
    records_dir=results / "records",
    collections_dir=results / "collections",
)
n = write_groups(records, snakemake.params.group_by, snakemake.output.groups)
log.info("atlas: %d maps selected, %d with a %s", len(records), n, snakemake.params.group_by)
