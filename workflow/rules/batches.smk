# Batches of z-map jobs (nvmeta/workflow/batches.py). Once every query has run, the plan cuts
# the selected images, by id, into batches; every z-map job waits for it (workflow/rules/zmap.smk)
# and joins its batch's group zmaps_<k>. Per batch, the batch's table (its images and each z-map's
# outcome) reads the batch's qc.json files, which connects its z-map jobs: Snakemake then submits
# each batch as one group job. In local runs Snakemake ignores groups; the plan and the tables are
# short jobs.


include: "helpers/batches.smk"


localrules:
    batch_plan,


wildcard_constraints:
    batch=r"0|[1-9][0-9]*",


checkpoint batch_plan:
    input:
        # as plain files: the plan runs after every query, and again when one changes
        selections=batch_plan_selections(),
    output:
        BATCH_PLAN,
    log:
        f"{LOGS}/batches/plan.log",
    params:
        size=config["cluster"]["zmap_batch_size"],
    run:
        # In-process, as the per-image jobs (nvmeta/workflow/jobs.py): it reads the selections only.
        from nvmeta.workflow.batches import plan_job

        plan_job(input.selections, params.size, output[0], log[0])


rule zmap_batch:
    input:
        qc=zmap_batch_inputs,
    output:
        f"{RESULTS}/batches/zmaps_{{batch}}.tsv",
    log:
        f"{LOGS}/batches/zmaps_{{batch}}.log",
    group:
        "zmaps_{batch}"
    threads: 1
    resources:
        # read after the batch's z-maps, in the same submission: it adds a minute, no memory
        mem_mb=100,
        runtime=1,
    run:
        # In-process, as the z-maps (nvmeta/workflow/jobs.py): it only reads the qc.json files.
        from nvmeta.workflow.batches import batch_job

        batch_job(wildcards.batch, input.qc, output[0], log[0])
