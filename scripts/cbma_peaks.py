"""Rule cbma_peaks: peaks of every included z-map of an analysis (peaks.tsv, peak_thresholds.tsv)."""

from nvmeta.cbma import peaks_table
from nvmeta.workflow.logs import job_logger
from nvmeta.workflow.rule_inputs import path_lookup

log = job_logger("nvmeta.cbma", snakemake.log[0])
peaks_table(
    snakemake.input.qc,
    path_lookup(snakemake.input.zmaps, "zmaps"),
    path_lookup(snakemake.input.qcjson, "qcjson"),
    snakemake.params.cbma,
    snakemake.output.peaks,
    log,
    thresholds_tsv=snakemake.output.thresholds,
)
