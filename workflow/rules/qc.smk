# Per analysis: the QC table (every selected image, included or excluded with its reason)
# and the funnel (selected -> downloaded -> converted -> passed QC).

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
    log:
        f"{LOGS}/qc/{{analysis}}.log",
    conda:
        "../../envs/nvmeta.yaml"
    resources:
        # the maps themselves up to the duplicate search's budget (about 2,000 maps), then a
        # subsample (measured, BENCHMARKS.md issue 12: 2,000 maps 2.0 GB, 5,000 maps 0.36 GB)
        mem_mb=lambda wildcards, input: 1000
        + min(2 * len(input.zmaps), DUPLICATE_SEARCH_BYTES // 2**20 + 600)
        + len(input.zmaps) // 100,
        runtime=lambda wildcards, input: 10 + len(input.zmaps) // 100,
    params:
        qc=config["qc"],
    run:
        # In-process (see nvmeta/workflow/jobs.py): this short fan-in is on every run's critical path.
        from nvmeta.workflow.jobs import qc_job

        qc_job(wildcards.analysis, input, output, log, params.qc)
