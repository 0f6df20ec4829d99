# Per image: t -> z with recorded degrees of freedom, resampled and masked onto the template
# grid (NaN = no data), plus qc.json; and Hedges' g / var(g) maps (nvmeta.images.effectsize) when an
# analysis pools effect sizes (EFFECT_OUTPUTS). One lean job per image.

from nvmeta.images.zmap import LIMIT_KEYS as ZMAP_LIMIT_KEYS


include: "helpers/zmap.smk"


rule zmap:
    input:
        metadata=f"{IMAGES}/metadata.json",
        mask=TEMPLATE_MASK,
        # after the plan of batches only (its group), never rerun by a new plan (ancient)
        plan=ancient(BATCH_PLAN),
    output:
        **EFFECT_OUTPUTS,
        zmap=f"{IMAGES}/zmap.nii.gz",
        qc=f"{IMAGES}/qc.json",
    log:
        f"{LOGS}/zmap/{{image_id}}.log",
    # zmaps_<k>, its batch: one cluster submission per batch (workflow/rules/batches.smk)
    group:
        zmap_batch_group
    threads: 1
    resources:
        mem_mb=1500,
        runtime=10,
    params:
        conversion=conversion_params,
        # the per-image plausibility rules of the qc block (max_n, max_t_per_sqrt_n, max_map_mb)
        limits={k: config["qc"][k] for k in ZMAP_LIMIT_KEYS},
    run:
        # In a warm worker process of this Snakemake process (nvmeta/workflow/pool.py), one per
        # core it was given: no interpreter start-up per image, no lock shared with the scheduler.
        from nvmeta.workflow.jobs import zmap_job

        zmap_job(
            wildcards.image_id,
            input,
            output,
            log,
            params.conversion,
            params.limits,
            workers=workflow.cores,
        )
