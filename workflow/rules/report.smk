# Per analysis: its first page in the report (one line per result, the warnings grouped, the
# funnel), the card of it that the report's landing page shows, and a methods paragraph for the
# paper with its BibTeX.


include: "helpers/report.smk"


localrules:
    overview,


rule overview:
    input:
        unpack(overview_inputs),
    output:
        page=report(
            f"{ANALYSIS}/overview.html",
            caption="../report/overview.rst",
            category="{analysis}",
            subcategory="Analysis overview",
            labels={"result": "overview"},
        ),
        # included by the landing page (workflow/report/workflow.rst), not a result of its own
        card=f"{ANALYSIS}/overview_card.html",
    log:
        f"{LOGS}/report/{{analysis}}_overview.log",
    params:
        methods=lambda wildcards: (
            config["analyses"][wildcards.analysis]["meta"] or {}
        ).get("methods", []),
        cbma_methods=lambda wildcards: (
            config["analyses"][wildcards.analysis].get("cbma") or {}
        ).get("methods", []),
    run:
        # In-process (see nvmeta/workflow/jobs.py): the last job of every run, light (HTML from tables).
        from nvmeta.workflow.jobs import overview_job

        overview_job(
            wildcards.analysis,
            input,
            output,
            log,
            params.methods,
            params.cbma_methods,
        )


rule methods:
    input:
        unpack(methods_inputs),
    output:
        html=report(
            f"{ANALYSIS}/methods.html",
            caption="../report/methods.rst",
            category="{analysis}",
            subcategory="Methods",
            labels={"result": "methods paragraph"},
        ),
        bib=report(
            f"{ANALYSIS}/references.bib",
            caption="../report/methods.rst",
            category="{analysis}",
            subcategory="Methods",
            labels={"result": "references (BibTeX)"},
        ),
    log:
        f"{LOGS}/report/{{analysis}}_methods.log",
    conda:
        "../../envs/nvmeta.yaml"
    params:
        methods=lambda wildcards: (
            config["analyses"][wildcards.analysis]["meta"] or {}
        ).get("methods", []),
        cbma_methods=lambda wildcards: (
            config["analyses"][wildcards.analysis].get("cbma") or {}
        ).get("methods", []),
    script:
        # a script job: the BibTeX comes from NiMARE's reference list, whose import would otherwise
        # set NiMARE's matplotlib defaults in the Snakemake process
        "../../scripts/methods.py"
