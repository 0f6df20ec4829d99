"""Rule qc: the per-analysis QC table and funnel."""

from pathlib import Path

from nvmeta.logs import job_logger
from nvmeta.qc import build_qc, write_qc

log = job_logger("nvmeta.qc", snakemake.log[0])
images = Path(snakemake.input.selection).parents[2] / "images"
qc_df, funnel_df = build_qc(
    snakemake.input.selection, lambda image_id: images / str(image_id), snakemake.params.qc, log
)
write_qc(qc_df, funnel_df, snakemake.output.qc, snakemake.output.funnel)
