"""Rule ica: spatial ICA across an analysis' included z-maps with term labels."""

from pathlib import Path

from nvmeta.ica import run_ica
from nvmeta.images.template import load_mask
from nvmeta.neurovault import make_client
from nvmeta.workflow.logs import job_logger
from nvmeta.workflow.rule_inputs import path_lookup

log = job_logger("nvmeta.ica", snakemake.log[0])
labeler = None
if "references" in snakemake.input.keys():  # labels from decoding against the task atlas
    from nvmeta.decode.decoding import top_labels

    def labeler(volume):
        return top_labels(snakemake.input.references, volume, load_mask(snakemake.input.mask),
                          int(snakemake.params.ica["n_terms"]))  # fmt: skip


run_ica(
    snakemake.input.qc,
    path_lookup(snakemake.input.zmaps, "zmaps"),
    path_lookup(snakemake.input.metadata, "metadata"),
    load_mask(snakemake.input.mask),
    snakemake.params.ica,
    Path(snakemake.output.components).parent,
    log,
    client_factory=lambda: make_client(snakemake.config["neurovault"]),
    threads=snakemake.threads,
    labeler=labeler,
)
