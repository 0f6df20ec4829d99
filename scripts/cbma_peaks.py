"""Rule cbma_peaks: peaks of every included z-map of an analysis (peaks.tsv)."""

from pathlib import Path

from nvmeta.cbma import peaks_table
from nvmeta.logs import job_logger

log = job_logger("nvmeta.cbma", snakemake.log[0])
images = Path(snakemake.input.qc).parents[2] / "images"
peaks_table(
    snakemake.input.qc,
    lambda image_id: images / str(image_id) / "zmap.nii.gz",
    lambda image_id: images / str(image_id) / "qc.json",
    snakemake.params.cbma,
    snakemake.output[0],
    log,
)
