"""Rule query: resolve one analysis into results/analyses/{analysis}/selection.tsv (+ its funnel)."""

import sys

from nvmeta.select.query import query_rule

sys.exit(
    query_rule(
        snakemake.config,
        snakemake.wildcards.analysis,
        snakemake.output.selection,
        snakemake.output.funnel,
        snakemake.log[0],
    )
)
