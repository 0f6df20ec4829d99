"""Rule ica_component: the figure of one ICA component."""

from nvmeta.figures.ica_maps import component_figure
from nvmeta.workflow.logs import job_logger

job_logger("nvmeta.figures.ica_maps", snakemake.log[0])
component_figure(
    snakemake.input.components,
    snakemake.input.summary,
    int(snakemake.wildcards.k),
    snakemake.output.png,
)
