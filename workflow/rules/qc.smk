# Per analysis: the QC table (every selected image, included or excluded with its reason),
# the funnel (selected -> downloaded -> converted -> passed QC), the consensus the inverted and
# outlier rules compare each map with, and its figure.

from nvmeta.images.consensus import CONSENSUS_BYTES
from nvmeta.images.qc import DUPLICATE_SEARCH_BYTES


rule qc:
    input:
        selection=f"{ANALYSIS}/selection.tsv",
        qc=per_image(f"{RESULTS}/images/{{image_id}}/qc.json"),
        zmaps=per_image(f"{RESULTS}/images/{{image_id}}/zmap.nii.gz"),
        mask=TEMPLATE_MASK,
    output:
        qc=report(
            f"{ANALYSIS}/qc.tsv",
            caption="../report/qc.rst",
            category="{analysis}",
            subcategory="Selection and QC",
            labels={"result": "QC table"},
        ),
        funnel=report(
            f"{ANALYSIS}/funnel.tsv",
            caption="../report/funnel.rst",
            category="{analysis}",
            subcategory="Selection and QC",
            labels={"result": "funnel"},
        ),
        consensus=f"{ANALYSIS}/qc_consensus.json",
    log:
        f"{LOGS}/qc/{{analysis}}.log",
    resources:
        # the maps themselves up to the duplicate search's budget (about 2,000 maps), then a
        # subsample, plus the consensus subsample (about 1 MB per map up to its budget); peaks
        # measured in BENCHMARKS.md, "Fan-ins at 2,000 / 5,000 / 20,000 maps"
        mem_mb=lambda wildcards, input: 1000
        + min(2 * len(input.zmaps), DUPLICATE_SEARCH_BYTES // 2**20 + 600)
        + min(len(input.zmaps), CONSENSUS_BYTES // 2**20)
        + len(input.zmaps) // 100,
        runtime=lambda wildcards, input: 10 + len(input.zmaps) // 100,
    params:
        qc=config["qc"],
    run:
        # In-process (see nvmeta/workflow/jobs.py): this short fan-in is on every run's critical path.
        from nvmeta.workflow.jobs import qc_job

        qc_job(wildcards.analysis, input, output, log, params.qc)


rule qc_figure:
    input:
        qc=f"{ANALYSIS}/qc.tsv",
        consensus=f"{ANALYSIS}/qc_consensus.json",
    output:
        report(
            f"{ANALYSIS}/figures/qc_consensus.png",
            caption="../report/qc_consensus.rst",
            category="{analysis}",
            subcategory="Selection and QC",
            labels={"result": "similarity to the consensus"},
        ),
    log:
        f"{LOGS}/qc/{{analysis}}_figure.log",
    conda:
        "../../envs/nvmeta.yaml"
    resources:
        mem_mb=1000,
    script:
        "../../scripts/qc_figure.py"
