"""Rule zmap: t -> z, resample and mask one image onto the template grid; write qc.json."""

from pathlib import Path

from nvmeta.logs import job_logger
from nvmeta.template import load_mask
from nvmeta.zmap import make_zmap

log = job_logger("nvmeta.zmap", snakemake.log[0])
meta_path = Path(snakemake.input.metadata)
qc = make_zmap(
    meta_path,
    meta_path.with_name("map.nii.gz"),
    load_mask(snakemake.input.mask),
    snakemake.params.conversion,
    snakemake.output.zmap,
    snakemake.output.qc,
)
log.info("image %s: %s %s", snakemake.wildcards.image_id, qc["status"], qc.get("reason") or "")
