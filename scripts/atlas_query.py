"""Checkpoint atlas_query: the atlas' selection (results/atlas/selection.tsv, its funnel) and each map's term."""

import sys

from nvmeta.decode.atlas import selection_cfg
from nvmeta.decode.terms import write_groups
from nvmeta.select.query import query_rule


def groups(records, log):
    n = write_groups(records, snakemake.params.group_by, snakemake.output.groups)
    log.info("atlas: %d maps selected, %d with a %s", len(records), n, snakemake.params.group_by)


# the same sources and the same query as the analyses' (scripts/query.py): dump, offline cache or API
sys.exit(
    query_rule(
        snakemake.config,
        None,
        snakemake.output.selection,
        snakemake.output.funnel,
        snakemake.log[0],
        selection_cfg=selection_cfg(snakemake.config["atlas"]),
        on_records=groups,
    )
)
