"""Rule input_figures: glass brains of every included z-map of an analysis."""

from pathlib import Path

from nvmeta.logs import job_logger
from nvmeta.plotting import glass_brain_grid, inputs_from_qc

log = job_logger("nvmeta.figures", snakemake.log[0])
images = Path(snakemake.input.qc).parents[2] / "images"
items = inputs_from_qc(snakemake.input.qc, lambda image_id: images / str(image_id) / "zmap.nii.gz")
glass_brain_grid(items, snakemake.output[0], suptitle=f"{snakemake.wildcards.analysis}: {len(items)} input z-maps")
log.info("%d included maps drawn", len(items))
