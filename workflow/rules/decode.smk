# Decoding (analyses.<name>.decode): each result map of an analysis against the task atlas
# (workflow/rules/atlas.smk). Two jobs per analysis: the leave-out references (the atlas without
# the analysis' own maps; the ICA labels read them too), then the correlations and their null.


include: "helpers/decode.smk"


rule decode_references:
    input:
        selection=f"{ANALYSIS}/selection.tsv",
        atlas=f"{ATLAS}/atlas.tsv",
        members=f"{ATLAS}/members.tsv",
        maps=atlas_term_files("z.nii.gz"),
        # the sums of the terms that lose maps, and those maps: nothing else of the atlas is read
        sums=lambda wildcards: [
            f"{ATLAS}/{s}/sums.npz" for s in sorted(_left_out(wildcards.analysis))
        ],
        zmaps=lambda wildcards: [
            f"{RESULTS}/images/{i}/zmap.nii.gz"
            for ids in _left_out(wildcards.analysis).values()
            for i in ids
        ],
        mask=TEMPLATE_MASK,
    output:
        table=f"{ANALYSIS}/decode/references.tsv",
        maps=directory(f"{ANALYSIS}/decode/references"),
    log:
        f"{LOGS}/decode/{{analysis}}_references.log",
    conda:
        "../../envs/nvmeta.yaml"
    resources:
        mem_mb=2000,
        runtime=lambda wildcards, input: 10 + len(input.zmaps) // 50,
    params:
        leave_out=lambda wildcards: decode_config(wildcards)["leave_out"],
        atlas=lambda wildcards: {
            k: config["atlas"][k]
            for k in ("min_maps", "min_collections", "min_fraction")
        },
    script:
        "../../scripts/decode_references.py"


rule decode:
    input:
        references=f"{ANALYSIS}/decode/references.tsv",
        reference_maps=f"{ANALYSIS}/decode/references",
        maps=atlas_term_files("z.nii.gz"),
        samples=atlas_term_files("sample.npz"),
        selection=f"{ANALYSIS}/selection.tsv",
        sources=lambda wildcards: [p for _, p in decode_sources(wildcards.analysis)],
        mask=TEMPLATE_MASK,
    output:
        table=report(
            f"{ANALYSIS}/decode/decoding.tsv",
            caption="../report/decoding_table.rst",
            category="{analysis}",
            subcategory="Decoding",
            labels={"result": "decoding table"},
        ),
        png=report(
            f"{ANALYSIS}/decode/decoding.png",
            caption="../report/decoding_figure.rst",
            category="{analysis}",
            subcategory="Decoding",
            labels={"result": "decoding figure"},
        ),
        summary=f"{ANALYSIS}/decode/summary.json",
    log:
        f"{LOGS}/decode/{{analysis}}.log",
    conda:
        "../../envs/nvmeta.yaml"
    threads: 1
    resources:
        mem_mb=decode_mem_mb,
        runtime=lambda wildcards, input: 20 + decode_config(wildcards)["n_null"] // 20,
    params:
        sources=lambda wildcards: [n for n, _ in decode_sources(wildcards.analysis)],
        decode=decode_config,
        atlas=lambda wildcards: {
            k: config["atlas"][k] for k in ("method", "min_fraction")
        },
    script:
        "../../scripts/decode.py"
