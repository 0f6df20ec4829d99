"""Rule input_figures: glass brains of every included z-map of an analysis."""

from pathlib import Path

from nvmeta.logs import job_logger
from nvmeta.meta import read_included
from nvmeta.plotting import glass_brain_grid

log = job_logger("nvmeta.figures", snakemake.log[0])
images = Path(snakemake.input.qc).parents[2] / "images"
rows = read_included(snakemake.input.qc)

def title(row):
    """Contrast definition, else name (pandas gives NaN for empty cells)."""
    texts = [row.get(k) for k in ("contrast_definition", "name")]
    return next((t for t in texts if isinstance(t, str) and t.strip()), None)


items = [
    (int(r["image_id"]), title(r), images / str(r["image_id"]) / "zmap.nii.gz")
    for r in rows.to_dict("records")
]
glass_brain_grid(items, snakemake.output[0], suptitle=f"{snakemake.wildcards.analysis}: {len(items)} input z-maps")
log.info("%d included maps drawn", len(items))
