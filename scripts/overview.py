"""Rule overview: an analysis' first page in the report (funnel, key figures, plain-language summary)."""

from pathlib import Path

from nvmeta.logs import job_logger
from nvmeta.overview import write_overview

log = job_logger("nvmeta.overview", snakemake.log[0])
inp = snakemake.input
meta_dirs = {
    m: Path(p).parent for m, p in zip(snakemake.params.methods, inp.get("summaries", []), strict=True)
}
figures = []
if "mean_z" in inp.keys():
    figures.append((inp.mean_z, "Mean z of the included maps (per voxel, over the maps with data)."))
    figures.append((inp.coverage, "Coverage: how many included maps have data at each voxel."))
write_overview(
    snakemake.output[0],
    snakemake.wildcards.analysis,
    inp.funnel,
    inp.qc,
    meta_dirs=meta_dirs,
    figures=figures,
    ica_terms_tsv=inp.get("ica_terms"),
    ica_figures=inp.get("ica_png", []),
    logger=log,
)
