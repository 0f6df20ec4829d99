# Fan-in 2: cross-study spatial ICA with term labels (rule ica), then one figure per component (rule
# ica_component), so that no output list depends on an analysis' config.
# Outputs: results/analyses/{a}/ica/components.nii.gz, mixing.tsv, terms.tsv, stability.tsv,
# summary.json, component_{k}.png.


include: "helpers/ica.smk"


# Only the analyses with an ica block; "(?!)" matches nothing when there is none.
ICA_ANALYSES = "|".join(analyses_with("ica")) or "(?!)"


rule ica:
    input:
        # with a decode block and an atlas, the labels come from decoding (decode.smk)
        unpack(lambda wildcards: ica_decode_inputs(wildcards.analysis)),
        qc=f"{ANALYSIS}/qc.tsv",
        zmaps=per_image(f"{RESULTS}/images/{{image_id}}/zmap.nii.gz"),
        metadata=per_image(f"{RESULTS}/images/{{image_id}}/metadata.json"),
        mask=TEMPLATE_MASK,
    output:
        components=f"{ANALYSIS}/ica/components.nii.gz",
        mixing=f"{ANALYSIS}/ica/mixing.tsv",
        summary=f"{ANALYSIS}/ica/summary.json",
        terms=report(
            f"{ANALYSIS}/ica/terms.tsv",
            caption="../report/ica_terms.rst",
            category="{analysis}",
            subcategory="ICA",
            labels={"result": "term table", "component": "all"},
        ),
        # always written (the correlations are empty with n_runs: 1), so that the outputs of the
        # rule do not depend on the config
        stability=report(
            f"{ANALYSIS}/ica/stability.tsv",
            caption="../report/ica_stability.rst",
            category="{analysis}",
            subcategory="ICA",
            labels={"result": "stability", "component": "all"},
        ),
    log:
        f"{LOGS}/ica/{{analysis}}.log",
    wildcard_constraints:
        analysis=ICA_ANALYSES,
    conda:
        "../../envs/nvmeta.yaml"
    threads: 2
    resources:
        # the maps x voxels float32 matrix is memory-mapped; FastICA works on a reduced copy.
        mem_mb=lambda wildcards, input: 2000 + len(input.zmaps),
        runtime=lambda wildcards, input: 10 + len(input.zmaps) // 50,
    params:
        ica=ica_config,
        analysis="{analysis}",
    script:
        "../../scripts/ica.py"


rule ica_component:
    input:
        components=f"{ANALYSIS}/ica/components.nii.gz",
        # the figure's title and threshold, as the ICA job recorded them
        summary=f"{ANALYSIS}/ica/summary.json",
        # not read by the job: the report label comes from it
        terms=f"{ANALYSIS}/ica/terms.tsv",
    output:
        png=report(
            f"{ANALYSIS}/ica/component_{{k}}.png",
            caption="../report/ica_component.rst",
            category="{analysis}",
            subcategory="ICA",
            labels=lambda wildcards, input: {
                "result": "component map",
                "component": ica_component_label(input.terms, wildcards.k),
            },
        ),
    log:
        f"{LOGS}/ica/{{analysis}}_component_{{k}}.log",
    wildcard_constraints:
        analysis=ICA_ANALYSES,
        k=r"0|[1-9][0-9]*",
    conda:
        "../../envs/nvmeta.yaml"
    threads: 1
    resources:
        # one component volume and a matplotlib figure
        mem_mb=1000,
        runtime=10,
    params:
        ica=ica_config,
        analysis="{analysis}",
    script:
        "../../scripts/ica_component.py"
