# Per analysis: its first page in the report (funnel, key figures, a plain-language summary).
# Its input function (overview_inputs) is in common.smk.


localrules:
    overview,


rule overview:
    input:
        unpack(overview_inputs),
    output:
        report(
            f"{ANALYSIS}/overview.html",
            caption="../report/overview.rst",
            category="{analysis}",
            subcategory="Analysis overview",
            labels={"result": "overview"},
        ),
    log:
        f"{LOGS}/report/{{analysis}}_overview.log",
    conda:
        "../../envs/nvmeta.yaml"
    params:
        methods=lambda wildcards: (
            config["analyses"][wildcards.analysis]["meta"] or {}
        ).get("methods", []),
    run:
        # In-process (see nvmeta/workflow/jobs.py): the last job of every run, light (HTML from tables).
        from nvmeta.workflow.jobs import overview_job

        overview_job(wildcards.analysis, input, output, log, params.methods)
