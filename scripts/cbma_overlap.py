"""Rule cbma_overlap: every IBMA method's FDR map vs every CBMA method's FWE maps."""

from pathlib import Path

from nvmeta.cbma import overlap
from nvmeta.logs import job_logger
from nvmeta.template import load_mask

log = job_logger("nvmeta.cbma", snakemake.log[0])
analysis_dir = Path(snakemake.output.table).parent
overlap(
    {m: analysis_dir / "meta" / m for m in snakemake.params.ibma_methods},
    {m: analysis_dir / "cbma" / m for m in snakemake.params.cbma_methods},
    load_mask(snakemake.input.mask),
    snakemake.params.cbma,
    snakemake.output.table,
    snakemake.output.clusters,
    snakemake.output.png,
    log,
)
