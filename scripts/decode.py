"""Rule decode: every result map of an analysis decoded against the atlas (decoding.tsv, decoding.png)."""

from nvmeta.decode.decoding import decode_analysis
from nvmeta.images.template import load_mask
from nvmeta.workflow.logs import job_logger

log = job_logger("nvmeta.decode.decoding", snakemake.log[0])
decode_analysis(
    list(zip(snakemake.params.sources, snakemake.input.sources, strict=True)),
    snakemake.input.references,
    snakemake.input.selection,
    list(snakemake.input.samples),
    load_mask(snakemake.input.mask),
    snakemake.params.atlas,
    snakemake.params.decode,
    snakemake.output.table,
    snakemake.output.png,
    snakemake.output.summary,
    log,
)
