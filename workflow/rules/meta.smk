# Fan-in 1: image-based meta-analysis of an analysis' included z-maps, one job per method.


rule meta:
    input:
        qc=f"{ANALYSIS}/qc.tsv",
        zmaps=per_image(f"{RESULTS}/images/{{image_id}}/zmap.nii.gz"),
        mask=TEMPLATE_MASK,
    output:
        z=f"{ANALYSIS}/meta/{{method}}/z.nii.gz",
        p=f"{ANALYSIS}/meta/{{method}}/p.nii.gz",
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
    log:
        f"{LOGS}/meta/{{analysis}}_{{method}}.log",
    conda:
        "../../envs/nvmeta.yaml"
    threads: lambda wildcards: 2 if wildcards.method == "permutation" else 1
    resources:
        # Streaming methods hold a few voxel-sized arrays; permutation holds maps x voxels float32.
        mem_mb=lambda wildcards, input: 2000
        + (len(input.zmaps) * 1 if wildcards.method == "permutation" else 0),
        runtime=lambda wildcards, input: 10
        + len(input.zmaps) // (20 if wildcards.method == "permutation" else 200),
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
    script:
        "../../scripts/input_figures.py"
