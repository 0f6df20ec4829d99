"""Rule input_figures: mean z, coverage, correlation matrix, per-map table and (few maps) glass brains."""

from nvmeta.figures.plotting import input_figures
from nvmeta.workflow.logs import job_logger
from nvmeta.workflow.rule_inputs import path_lookup

log = job_logger("nvmeta.figures", snakemake.log[0])
input_figures(
    snakemake.input.qc,
    path_lookup(snakemake.input.zmaps, "zmaps"),
    path_lookup(snakemake.input.qcjson, "qcjson"),
    snakemake.input.mask,
    dict(snakemake.output.items()),
    snakemake.params.figures,
    snakemake.wildcards.analysis,
    threads=snakemake.threads,
    logger=log,
    cut_coords=snakemake.params.cut_coords,
)
