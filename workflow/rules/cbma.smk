# Fan-in 3: coordinate-based meta-analysis (NiMARE) of peaks extracted from the included z-maps,
# compared with the image-based one, and the analysis exported as a NiMARE studyset/Dataset.
# Outputs: results/analyses/{a}/cbma/peaks.tsv, cbma/{cbma_method}/, overlap.tsv, nimare/.

from nvmeta.cbma.estimate import BASE_MAPS, FWE_MAPS
from nvmeta.workflow.methods import cbma_methods

CBMA_METHODS = cbma_methods()
# The uncorrected maps of a CBMA method and NiMARE's FWE maps written next to them.
CBMA_MAPS = BASE_MAPS + FWE_MAPS


include: "helpers/cbma.smk"


wildcard_constraints:
    cbma_method="|".join(CBMA_METHODS),


rule cbma_peaks:
    input:
        qc=f"{ANALYSIS}/qc.tsv",
        zmaps=per_image(f"{RESULTS}/images/{{image_id}}/zmap.nii.gz"),
        qcjson=per_image(f"{RESULTS}/images/{{image_id}}/qc.json"),
    output:
        peaks=report(
            f"{ANALYSIS}/cbma/peaks.tsv",
            caption="../report/cbma_peaks.rst",
            category="{analysis}",
            subcategory="IBMA vs CBMA",
            labels={"result": "extracted peaks", "method": "all maps"},
        ),
        thresholds=f"{ANALYSIS}/cbma/peak_thresholds.tsv",
    log:
        f"{LOGS}/cbma/{{analysis}}_peaks.log",
    conda:
        "../../envs/nvmeta.yaml"
    threads: 1
    resources:
        # one map at a time, whatever the number of maps; time per map: BENCHMARKS.md, "CBMA
        # beside IBMA" (plus nilearn's per-map inference)
        mem_mb=1500,
        runtime=lambda wildcards, input: 10 + len(input.zmaps) // 10,
    params:
        cbma=cbma_peak_params,
    script:
        "../../scripts/cbma_peaks.py"


rule cbma:
    input:
        peaks=f"{ANALYSIS}/cbma/peaks.tsv",
        mask=TEMPLATE_MASK,
        # not read: their number sizes the job (resources), known once the query has run
        qcjson=per_image(f"{RESULTS}/images/{{image_id}}/qc.json"),
    output:
        maps=[f"{ANALYSIS}/cbma/{{cbma_method}}/{name}.nii.gz" for name in CBMA_MAPS],
        clusters=report(
            f"{ANALYSIS}/cbma/{{cbma_method}}/clusters.tsv",
            caption="../report/cbma_clusters.rst",
            category="{analysis}",
            subcategory="IBMA vs CBMA",
            labels={"result": "CBMA cluster table", "method": "{cbma_method}"},
        ),
        png=report(
            f"{ANALYSIS}/cbma/{{cbma_method}}/z.png",
            caption="../report/cbma_z.rst",
            category="{analysis}",
            subcategory="IBMA vs CBMA",
            labels={"result": "CBMA z mosaic", "method": "{cbma_method}"},
        ),
        summary=f"{ANALYSIS}/cbma/{{cbma_method}}/summary.json",
    log:
        f"{LOGS}/cbma/{{analysis}}_{{cbma_method}}.log",
    conda:
        "../../envs/nvmeta.yaml"
    threads: 2
    resources:
        # NiMARE's own footprint grows with the experiments (BENCHMARKS.md, "CBMA beside IBMA"),
        # twice over for the Monte-Carlo workers.
        mem_mb=lambda wildcards, input: 1500 + 10 * len(input.qcjson),
        # the Monte-Carlo iterations dominate, their cost growing with the experiments
        # (BENCHMARKS.md, "CBMA beside IBMA")
        runtime=lambda wildcards, input: 10
        + int(cbma_config(wildcards)["n_iters"] * (1 + len(input.qcjson) / 100) / 200),
    params:
        cbma=cbma_run_params,
    script:
        "../../scripts/cbma.py"


rule cbma_overlap:
    input:
        ibma=lambda wildcards: expand(
            f"{RESULTS}/analyses/{{analysis}}/meta/{{method}}/z_fdr.nii.gz",
            analysis=wildcards.analysis,
            method=config["analyses"][wildcards.analysis]["meta"]["methods"],
        ),
        cbma=lambda wildcards: expand(
            f"{RESULTS}/analyses/{{analysis}}/cbma/{{cbma_method}}/{{name}}.nii.gz",
            analysis=wildcards.analysis,
            cbma_method=cbma_config(wildcards)["methods"],
            name=CBMA_MAPS,
        ),
        mask=TEMPLATE_MASK,
    output:
        table=report(
            f"{ANALYSIS}/overlap.tsv",
            caption="../report/cbma_overlap.rst",
            category="{analysis}",
            subcategory="IBMA vs CBMA",
            labels={"result": "IBMA vs CBMA overlap", "method": "all methods"},
        ),
        clusters=f"{ANALYSIS}/overlap_clusters.tsv",
        png=report(
            f"{ANALYSIS}/figures/ibma_vs_cbma.png",
            caption="../report/cbma_overlap.rst",
            category="{analysis}",
            subcategory="IBMA vs CBMA",
            labels={"result": "IBMA vs CBMA figure", "method": "all methods"},
        ),
    log:
        f"{LOGS}/cbma/{{analysis}}_overlap.log",
    conda:
        "../../envs/nvmeta.yaml"
    resources:
        mem_mb=2000,
    params:
        cbma=cbma_config,
        ibma_methods=lambda wildcards: config["analyses"][wildcards.analysis]["meta"][
            "methods"
        ],
        cbma_methods=lambda wildcards: cbma_config(wildcards)["methods"],
    script:
        "../../scripts/cbma_overlap.py"


rule nimare_export:
    input:
        qc=f"{ANALYSIS}/qc.tsv",
        peaks=f"{ANALYSIS}/cbma/peaks.tsv",
        zmaps=per_image(f"{RESULTS}/images/{{image_id}}/zmap.nii.gz"),
        qcjson=per_image(f"{RESULTS}/images/{{image_id}}/qc.json"),
        metadata=per_image(f"{RESULTS}/images/{{image_id}}/metadata.json"),
        mask=TEMPLATE_MASK,
    output:
        studyset=f"{ANALYSIS}/nimare/studyset.json",
        dataset=f"{ANALYSIS}/nimare/dataset.pkl.gz",
    log:
        f"{LOGS}/cbma/{{analysis}}_nimare_export.log",
    conda:
        "../../envs/nvmeta.yaml"
    resources:
        mem_mb=lambda wildcards, input: 1500 + len(input.zmaps) // 2,
    params:
        analysis=lambda wildcards: wildcards.analysis,
        # the results root (the qc table's results/analyses/{a}/ prefix): export paths are relative to it
        results=lambda wildcards, input: input.qc.split("/analyses/", 1)[0],
    script:
        "../../scripts/nimare_export.py"
