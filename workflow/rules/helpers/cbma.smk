# Helpers of the coordinate-based meta-analysis rules (workflow/rules/cbma.smk): the cbma block
# split into what the peaks and what the estimation depend on, and the outputs of the block.


# Keys of the cbma block the peak extraction depends on (changing n_iters keeps the peaks).
CBMA_PEAK_KEYS = [
    "peaks_from",
    "peak_correction",
    "peak_alpha",
    "peak_threshold",
    "peak_distance",
    "max_peaks_per_cluster",
    "min_cluster_voxels",
]


def cbma_config(wildcards):
    return config["analyses"][wildcards.analysis]["cbma"]


def cbma_peak_params(wildcards):
    cbma = cbma_config(wildcards)
    return {k: cbma[k] for k in CBMA_PEAK_KEYS}


def cbma_run_params(wildcards):
    cbma = cbma_config(wildcards)
    return {k: v for k, v in cbma.items() if k not in CBMA_PEAK_KEYS + ["methods"]}


def cbma_outputs(analysis):
    """Everything the cbma block of an analysis produces (for all_outputs)."""
    spec = config["analyses"][analysis]
    d = f"{RESULTS}/analyses/{analysis}"
    out = [
        f"{d}/cbma/peaks.tsv",
        f"{d}/nimare/studyset.json",
        f"{d}/nimare/dataset.pkl.gz",
    ]
    for method in spec["cbma"]["methods"]:
        out += [
            f"{d}/cbma/{method}/{name}"
            for name in ("z.nii.gz", "clusters.tsv", "z.png", "summary.json")
        ]
    if spec["meta"] is not None:
        out += [f"{d}/overlap.tsv", f"{d}/figures/ibma_vs_cbma.png"]
    return out
