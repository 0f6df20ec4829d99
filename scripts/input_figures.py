"""Rule input_figures: mean z, coverage, correlation matrix, per-map table and (few maps) glass brains."""

from pathlib import Path

from nvmeta.logs import job_logger
from nvmeta.plotting import input_figures

log = job_logger("nvmeta.figures", snakemake.log[0])
input_figures(
    snakemake.input.qc,
    Path(snakemake.input.qc).parents[2] / "images",
    snakemake.input.mask,
    dict(snakemake.output.items()),
    snakemake.params.figures,
    snakemake.wildcards.analysis,
    threads=snakemake.threads,
    logger=log,
)
