"""Rule meta: one meta-analysis method over an analysis' included maps."""

from pathlib import Path

from nvmeta.images.template import load_mask
from nvmeta.meta import run_method
from nvmeta.meta.units import paths_by_image
from nvmeta.workflow.logs import job_logger

log = job_logger("nvmeta.meta", snakemake.log[0])


zmaps = paths_by_image(snakemake.input.zmaps)
qcs = paths_by_image(snakemake.input.qcs)
gs, vargs = paths_by_image(snakemake.input.get("g", [])), paths_by_image(snakemake.input.get("varg", []))
run_method(
    snakemake.wildcards.method,
    snakemake.input.qc,
    zmaps.__getitem__,
    load_mask(snakemake.input.mask),
    snakemake.params.meta,
    Path(snakemake.output.z).parent,
    log,
    n_jobs=snakemake.threads,
    qc_json_for=qcs.__getitem__,
    effect_paths_for=lambda i: (gs[i], vargs[i]),
)
