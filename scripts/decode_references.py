"""Rule decode_references: the atlas' references without the analysis' own maps (exact leave-out)."""

from pathlib import Path

from nvmeta.decode.references import write_references
from nvmeta.decode.terms import read_members
from nvmeta.images.template import load_mask
from nvmeta.workflow.logs import job_logger
from nvmeta.workflow.rule_inputs import path_lookup

log = job_logger("nvmeta.decode.references", snakemake.log[0])
maps = {Path(p).parent.name: Path(p) for p in snakemake.input.maps}
sums = {Path(p).parent.name: Path(p) for p in snakemake.input.sums}
write_references(
    snakemake.input.selection,
    snakemake.input.atlas,
    read_members(snakemake.input.members),
    maps.__getitem__,
    sums.__getitem__,
    path_lookup(snakemake.input.zmaps, "zmaps"),
    load_mask(snakemake.input.mask),
    snakemake.params.atlas,
    snakemake.params.leave_out,
    snakemake.output.table,
    snakemake.output.maps,
    log,
)
