"""Rule download: metadata.json (+ map.nii.gz when the image can be had) for one image."""

from pathlib import Path

from nvmeta.client import make_client
from nvmeta.download import fetch_image
from nvmeta.logs import job_logger

log = job_logger("nvmeta.download", snakemake.log[0])
nv = snakemake.config["neurovault"]
out_dir = Path(snakemake.output[0]).parent
result = fetch_image(
    make_client(nv),
    int(snakemake.wildcards.image_id),
    out_dir,
    nv["mode"],
    out_dir.parent.parent / "collections",
)
