# Resolve each analysis into its selection of images (a checkpoint: the per-image jobs are
# known only once it has run). Re-runs when the part of the config that selects images changes.


localrules:
    query,


checkpoint query:
    input:
        # a changed dump file re-runs the query (its path is in the params too)
        dump=lambda wildcards: (
            [config["neurovault"]["dump"]] if config["neurovault"].get("dump") else []
        ),
    output:
        selection=report(
            f"{ANALYSIS}/selection.tsv",
            caption="../report/selection.rst",
            category="{analysis}",
            subcategory="Selection and QC",
            labels={"result": "selection"},
        ),
        funnel=f"{ANALYSIS}/query_funnel.json",
    log:
        f"{LOGS}/query/{{analysis}}.log",
    conda:
        "../../envs/nvmeta.yaml"
    resources:
        nv_connections=1,
    params:
        spec=lambda wildcards: analysis_query_spec(
            query_selection_cfg(config["analyses"][wildcards.analysis]),
            config["neurovault"]["url"],
            dump=config["neurovault"].get("dump"),
        ),
    script:
        "../../scripts/query.py"
