# Helpers of the overview page and the methods paragraph (workflow/rules/report.smk): what each
# reads of an analysis' results.


def methods_inputs(wildcards):
    """What the methods paragraph of an analysis reads: its funnel and QC table, the summary of
    every fan-in it runs."""
    spec = config["analyses"][wildcards.analysis]
    d = f"{RESULTS}/analyses/{wildcards.analysis}"
    out = {"funnel": f"{d}/funnel.tsv", "qc": f"{d}/qc.tsv"}
    if spec["meta"] is not None:
        out["summaries"] = [
            f"{d}/meta/{m}/summary.json" for m in spec["meta"]["methods"]
        ]
    if spec.get("cbma") is not None:
        out["cbma_summaries"] = [
            f"{d}/cbma/{m}/summary.json" for m in spec["cbma"]["methods"]
        ]
    if spec["ica"] is not None:
        out["ica_summary"] = f"{d}/ica/summary.json"
    return out


def overview_inputs(wildcards):
    """What the overview page of an analysis reads: the methods paragraph's inputs, each
    result's thresholded map and figures, and the tables behind its one-line results."""
    spec = config["analyses"][wildcards.analysis]
    d = f"{RESULTS}/analyses/{wildcards.analysis}"
    out = methods_inputs(wildcards)
    if spec["meta"] is not None:
        methods = spec["meta"]["methods"]
        out["z_fdr"] = [f"{d}/meta/{m}/z_fdr.nii.gz" for m in methods]
        out["z_png"] = [f"{d}/meta/{m}/z.png" for m in methods]
        out["est_png"] = [
            f"{d}/meta/{m}/est.png" for m in methods if m in EFFECT_METHODS
        ]
        for key in ("mean_z", "coverage", "correlation"):
            out[key] = f"{d}/figures/inputs_{key}.png"
    if spec.get("cbma") is not None:
        out["cbma_png"] = [f"{d}/cbma/{m}/z.png" for m in spec["cbma"]["methods"]]
        if spec["meta"] is not None:
            out["overlap"] = f"{d}/overlap.tsv"
            out["overlap_png"] = f"{d}/figures/ibma_vs_cbma.png"
    if spec["ica"] is not None:
        out["ica_terms"] = f"{d}/ica/terms.tsv"
        out["ica_png"] = [
            f"{d}/ica/component_{k}.png" for k in range(spec["ica"]["n_components"])
        ]
        if spec["ica"]["n_runs"] > 1:
            out["ica_stability"] = f"{d}/ica/stability.tsv"
    if spec.get("decode") is not None:
        out["decoding"] = f"{d}/decode/decoding.tsv"
        out["decoding_png"] = f"{d}/decode/decoding.png"
        out["decode_summary"] = f"{d}/decode/summary.json"
    return out
