# Fan-in 1: image-based meta-analysis of an analysis' included maps, one job per method:
# rule meta for the z methods, rule meta_effect for the effect-size methods (pooled Hedges' g).


include: "helpers/meta.smk"


rule meta:
    input:
        qc=f"{ANALYSIS}/qc.tsv",
        zmaps=per_image(f"{RESULTS}/images/{{image_id}}/zmap.nii.gz"),
        # qc.json holds each image's one resolved sample size (n), read by the weighting methods
        qcs=per_image(f"{RESULTS}/images/{{image_id}}/qc.json"),
        mask=TEMPLATE_MASK,
    output:
        z=f"{ANALYSIS}/meta/{{method}}/z.nii.gz",
        p=f"{ANALYSIS}/meta/{{method}}/p.nii.gz",
        logp=f"{ANALYSIS}/meta/{{method}}/logp.nii.gz",
        k=f"{ANALYSIS}/meta/{{method}}/k.nii.gz",
        q=f"{ANALYSIS}/meta/{{method}}/q.nii.gz",
        z_fdr=f"{ANALYSIS}/meta/{{method}}/z_fdr.nii.gz",
        z_bonf=f"{ANALYSIS}/meta/{{method}}/z_bonf.nii.gz",
        summary=f"{ANALYSIS}/meta/{{method}}/summary.json",
        clusters=report(
            f"{ANALYSIS}/meta/{{method}}/clusters.tsv",
            caption="../report/clusters.rst",
            category="{analysis}",
            subcategory="Meta-analysis",
            labels={"result": "cluster table", "method": "{method}"},
        ),
        png=report(
            f"{ANALYSIS}/meta/{{method}}/z.png",
            caption="../report/meta_z.rst",
            category="{analysis}",
            subcategory="Meta-analysis",
            labels={"result": "z mosaic", "method": "{method}"},
        ),
        jackknife=report(
            f"{ANALYSIS}/meta/{{method}}/jackknife.tsv",
            caption="../report/meta_jackknife.rst",
            category="{analysis}",
            subcategory="Meta-analysis",
            labels={"result": "jackknife", "method": "{method}"},
        ),
    log:
        f"{LOGS}/meta/{{analysis}}_{{method}}.log",
    wildcard_constraints:
        method="|".join(Z_METHODS),
    conda:
        "../../envs/nvmeta.yaml"
    threads: lambda wildcards: 2 if wildcards.method == "permutation" else 1
    resources:
        # Streaming methods hold a few voxel-sized arrays; permutation up to 1 GiB of
        # permutations x voxels whatever the number of maps (meta_mem_mb).
        mem_mb=meta_mem_mb,
        # Permutation: proportional to maps x n_perm x voxels (meta_runtime).
        runtime=meta_runtime,
    params:
        meta=meta_params,
    script:
        "../../scripts/meta.py"


rule meta_effect:
    input:
        qc=f"{ANALYSIS}/qc.tsv",
        zmaps=per_image(f"{RESULTS}/images/{{image_id}}/zmap.nii.gz"),
        qcs=per_image(f"{RESULTS}/images/{{image_id}}/qc.json"),
        g=per_image(f"{RESULTS}/images/{{image_id}}/g.nii.gz"),
        varg=per_image(f"{RESULTS}/images/{{image_id}}/varg.nii.gz"),
        mask=TEMPLATE_MASK,
    output:
        z=f"{ANALYSIS}/meta/{{method}}/z.nii.gz",
        p=f"{ANALYSIS}/meta/{{method}}/p.nii.gz",
        logp=f"{ANALYSIS}/meta/{{method}}/logp.nii.gz",
        k=f"{ANALYSIS}/meta/{{method}}/k.nii.gz",
        q=f"{ANALYSIS}/meta/{{method}}/q.nii.gz",
        z_fdr=f"{ANALYSIS}/meta/{{method}}/z_fdr.nii.gz",
        z_bonf=f"{ANALYSIS}/meta/{{method}}/z_bonf.nii.gz",
        est=f"{ANALYSIS}/meta/{{method}}/est.nii.gz",
        se=f"{ANALYSIS}/meta/{{method}}/se.nii.gz",
        tau2=f"{ANALYSIS}/meta/{{method}}/tau2.nii.gz",
        Q=f"{ANALYSIS}/meta/{{method}}/Q.nii.gz",
        I2=f"{ANALYSIS}/meta/{{method}}/I2.nii.gz",
        summary=f"{ANALYSIS}/meta/{{method}}/summary.json",
        clusters=report(
            f"{ANALYSIS}/meta/{{method}}/clusters.tsv",
            caption="../report/clusters.rst",
            category="{analysis}",
            subcategory="Meta-analysis",
            labels={"result": "cluster table", "method": "{method}"},
        ),
        jackknife=report(
            f"{ANALYSIS}/meta/{{method}}/jackknife.tsv",
            caption="../report/meta_jackknife.rst",
            category="{analysis}",
            subcategory="Meta-analysis",
            labels={"result": "jackknife", "method": "{method}"},
        ),
        png=report(
            f"{ANALYSIS}/meta/{{method}}/z.png",
            caption="../report/meta_z.rst",
            category="{analysis}",
            subcategory="Meta-analysis",
            labels={"result": "z mosaic", "method": "{method}"},
        ),
        est_png=report(
            f"{ANALYSIS}/meta/{{method}}/est.png",
            caption="../report/meta_effect.rst",
            category="{analysis}",
            subcategory="Meta-analysis",
            labels={"result": "effect size and I2", "method": "{method}"},
        ),
    log:
        f"{LOGS}/meta/{{analysis}}_{{method}}.log",
    wildcard_constraints:
        method="|".join(EFFECT_METHODS),
    conda:
        "../../envs/nvmeta.yaml"
    threads: 1
    resources:
        # what pass 2 reads (g, and var(g) for random effects and the jackknife; nothing for
        # fixed effects without the jackknife) goes to a float32 stack on disk through a 128 MB
        # buffer; pooling works in voxel chunks of ~192 MB (nvmeta.meta.effects.CHUNK_BYTES);
        # the jackknife (at most 300 units) holds the cluster voxels of every unit, so the peak is
        # flat in the maps (BENCHMARKS.md, "Fan-ins at 2,000 / 5,000 / 20,000 maps"). The maps / 20
        # term is for the chunk arrays, which grow with the maps above ~6,000 (256 voxels at least
        # per chunk): ~1 GB at 50,000.
        mem_mb=lambda wildcards, input: 2500 + len(input.zmaps) // 20,
        runtime=lambda wildcards, input: 10 + len(input.zmaps) // 100,
    params:
        meta=meta_params,
    script:
        "../../scripts/meta.py"


rule meta_sensitivity:
    input:
        summaries=lambda wildcards: expand(
            f"{RESULTS}/analyses/{{analysis}}/meta/{{method}}/summary.json",
            analysis=wildcards.analysis,
            method=config["analyses"][wildcards.analysis]["meta"]["methods"],
        ),
        mask=TEMPLATE_MASK,
    output:
        report(
            f"{ANALYSIS}/meta/sensitivity.tsv",
            caption="../report/sensitivity.rst",
            category="{analysis}",
            subcategory="Meta-analysis",
            labels={"result": "sensitivity", "method": "all methods"},
        ),
    log:
        f"{LOGS}/meta/{{analysis}}_sensitivity.log",
    conda:
        "../../envs/nvmeta.yaml"
    script:
        "../../scripts/meta_sensitivity.py"


rule input_figures:
    input:
        qc=f"{ANALYSIS}/qc.tsv",
        zmaps=per_image(f"{RESULTS}/images/{{image_id}}/zmap.nii.gz"),
        qcjson=per_image(f"{RESULTS}/images/{{image_id}}/qc.json"),
        mask=TEMPLATE_MASK,
    output:
        table=report(
            f"{ANALYSIS}/figures/inputs.tsv",
            caption="../report/inputs_table.rst",
            category="{analysis}",
            subcategory="Inputs",
            labels={"result": "per-map table"},
        ),
        mean_z=report(
            f"{ANALYSIS}/figures/inputs_mean_z.png",
            caption="../report/inputs_mean_z.rst",
            category="{analysis}",
            subcategory="Inputs",
            labels={"result": "mean z map"},
        ),
        coverage=report(
            f"{ANALYSIS}/figures/inputs_coverage.png",
            caption="../report/inputs_coverage.rst",
            category="{analysis}",
            subcategory="Inputs",
            labels={"result": "coverage map"},
        ),
        correlation=report(
            f"{ANALYSIS}/figures/inputs_correlation.png",
            caption="../report/inputs_correlation.rst",
            category="{analysis}",
            subcategory="Inputs",
            labels={"result": "correlation matrix"},
        ),
        glass=report(
            f"{ANALYSIS}/figures/inputs_glass_brain.png",
            caption="../report/inputs.rst",
            category="{analysis}",
            subcategory="Inputs",
            labels={"result": "input glass brains"},
        ),
    log:
        f"{LOGS}/figures/{{analysis}}_inputs.log",
    conda:
        "../../envs/nvmeta.yaml"
    threads: 1
    resources:
        # O(voxels) + the correlation matrix's sampled voxels (<= 80 MB) + O(maps^2)
        mem_mb=lambda wildcards, input: 1500
        + min(len(input.zmaps), config["figures"]["correlation_max_maps"]) ** 2
        * 40
        // 2**20,
        runtime=lambda wildcards, input: 10 + len(input.zmaps) // 100,
    params:
        figures=config["figures"],
        # the mean z and coverage mosaics show the slices of the meta-analysis mosaics
        cut_coords=lambda wildcards: config["analyses"][wildcards.analysis]["meta"][
            "cut_coords"
        ],
    script:
        "../../scripts/input_figures.py"
