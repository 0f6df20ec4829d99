"""Rule ica_<analysis>: spatial ICA across the included z-maps with term labels."""

from pathlib import Path

from nvmeta.client import make_client
from nvmeta.ica import run_ica
from nvmeta.logs import job_logger
from nvmeta.template import load_mask

log = job_logger("nvmeta.ica", snakemake.log[0])
images = Path(snakemake.input.qc).parents[2] / "images"
run_ica(
    snakemake.input.qc,
    lambda image_id: images / str(image_id) / "zmap.nii.gz",
    lambda image_id: images / str(image_id) / "metadata.json",
    load_mask(snakemake.input.mask),
    snakemake.params.ica,
    Path(snakemake.output[0]).parent,
    log,
    client_factory=lambda: make_client(snakemake.config["neurovault"]),
    threads=snakemake.threads,
)
