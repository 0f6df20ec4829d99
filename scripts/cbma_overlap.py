"""Rule cbma_overlap: every IBMA method's FDR map vs every CBMA method's FWE maps."""

from pathlib import Path

from nvmeta.cbma.overlap import overlap
from nvmeta.images.template import load_mask
from nvmeta.workflow.logs import job_logger

log = job_logger("nvmeta.cbma", snakemake.log[0])
# each method's directory, from the maps the rule declares (meta/{m}/z_fdr.nii.gz, cbma/{m}/*.nii.gz)
ibma_dirs = {Path(p).parent.name: Path(p).parent for p in snakemake.input.ibma}
cbma_dirs = {Path(p).parent.name: Path(p).parent for p in snakemake.input.cbma}
overlap(
    {m: ibma_dirs[m] for m in snakemake.params.ibma_methods},
    {m: cbma_dirs[m] for m in snakemake.params.cbma_methods},
    load_mask(snakemake.input.mask),
    snakemake.params.cbma,
    snakemake.output.table,
    snakemake.output.clusters,
    snakemake.output.png,
    log,
)
