# Per analysis: its first page in the report (funnel, key figures, a plain-language summary).
# The input function lives here with the one rule that uses it.


def overview_inputs(wildcards):
    """What the overview page of an analysis reads: its funnel and QC table, and the outputs of
    the fan-ins the analysis runs."""
    spec = config["analyses"][wildcards.analysis]
    d = f"{RESULTS}/analyses/{wildcards.analysis}"
    out = {"funnel": f"{d}/funnel.tsv", "qc": f"{d}/qc.tsv"}
    if spec["meta"] is not None:
        methods = spec["meta"]["methods"]
        out["summaries"] = [f"{d}/meta/{m}/summary.json" for m in methods]
        out["z_fdr"] = [f"{d}/meta/{m}/z_fdr.nii.gz" for m in methods]
        out["z_png"] = [f"{d}/meta/{m}/z.png" for m in methods]
        out["mean_z"] = f"{d}/figures/inputs_mean_z.png"
        out["coverage"] = f"{d}/figures/inputs_coverage.png"
    if spec["ica"] is not None:
        out["ica_terms"] = f"{d}/ica/terms.tsv"
        out["ica_png"] = [
            f"{d}/ica/component_{k}.png" for k in range(spec["ica"]["n_components"])
        ]
    return out


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
    script:
        "../../scripts/overview.py"
