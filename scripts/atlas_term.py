"""Rule atlas_term: one term's reference map, sums (for exact leave-out) and voxel sample (for the null)."""

from pathlib import Path

from nvmeta.decode.atlas import build_term
from nvmeta.images.template import load_mask
from nvmeta.workflow.logs import job_logger
from nvmeta.workflow.rule_inputs import path_lookup

log = job_logger("nvmeta.decode.atlas", snakemake.log[0])
build_term(
    snakemake.params.term,
    snakemake.wildcards.term,
    [tuple(m) for m in snakemake.params.members],
    path_lookup(snakemake.input.zmaps, "zmaps"),
    load_mask(snakemake.input.mask),
    snakemake.params.atlas,
    Path(snakemake.output.z).parent,
    log,
)
