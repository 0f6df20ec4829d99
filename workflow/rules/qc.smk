# Per analysis: the QC table (every selected image, included or excluded with its reason)
# and the funnel (selected -> downloaded -> converted -> passed QC).


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
        mem_mb=lambda wildcards, input: 1000 + 2 * len(input.zmaps),
        runtime=lambda wildcards, input: 10 + len(input.zmaps) // 100,
    params:
        qc=config["qc"],
    run:
        # In-process (see nvmeta/jobs.py): this short fan-in is on every run's critical path.
        from nvmeta.jobs import qc_job

        qc_job(wildcards.analysis, input, output, log, params.qc)
