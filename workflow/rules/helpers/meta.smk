# Helpers of the image-based meta-analysis rules (workflow/rules/meta.smk): each method's params,
# the resources of the z-method jobs, and the outputs of an analysis' meta block.


# Parameters of the meta block each method depends on (so that e.g. n_perm only reruns permutation).
META_COMMON_KEYS = [
    "min_maps",
    "min_fraction",
    "alpha",
    "two_sided",
    "combine_within",
    "dependence",
    "threshold",
    "cut_coords",
    "vmax",
    "min_cluster_voxels",
    "cluster_threshold_z",
    "jackknife",
]
META_PERM_KEYS = ["n_perm", "random_state"]
META_EFFECT_KEYS = ["trim"]


def meta_params(wildcards):
    """The meta block keys a method depends on (adding a method does not rerun the others)."""
    meta = config["analyses"][wildcards.analysis]["meta"]
    keys = META_COMMON_KEYS + (
        META_PERM_KEYS if wildcards.method == "permutation" else []
    )
    if wildcards.method in EFFECT_METHODS:
        keys = keys + META_EFFECT_KEYS
    return {k: meta[k] for k in keys}


def meta_outputs(analysis):
    """Everything the meta block of an analysis produces (for all_outputs)."""
    meta = config["analyses"][analysis]["meta"]
    fig = f"{RESULTS}/analyses/{analysis}/figures"
    out = [
        f"{fig}/{name}"
        for name in (
            "inputs.tsv",
            "inputs_mean_z.png",
            "inputs_coverage.png",
            "inputs_correlation.png",
            "inputs_glass_brain.png",
        )
    ]
    for method in meta["methods"]:
        d = f"{RESULTS}/analyses/{analysis}/meta/{method}"
        out += [
            f"{d}/z.nii.gz",
            f"{d}/clusters.tsv",
            f"{d}/z.png",
            f"{d}/jackknife.tsv",
        ]
        if method in EFFECT_METHODS:
            out += [f"{d}/est.nii.gz", f"{d}/est.png"]
    if len(meta["methods"]) > 1:
        out.append(f"{RESULTS}/analyses/{analysis}/meta/sensitivity.tsv")
    return out


def meta_mem_mb(wildcards, input):
    """``mem_mb`` of a z-method meta job. Streaming methods: 2 GB whatever the number of maps.
    Permutation: 2 GB plus the peak that :func:`nvmeta.meta.budget.permutation_memory_bytes`
    estimates for these maps on this mask with the analysis' ``n_perm``, the same estimate with
    which the job refuses to start on a machine that has less (flat in the number of maps:
    BENCHMARKS.md, "Fan-ins at 2,000 / 5,000 / 20,000 maps").
    """
    if wildcards.method != "permutation":
        return 2000
    from nvmeta.meta.budget import permutation_memory_bytes

    voxels = template_mask_voxels(input)
    n_perm = config["analyses"][wildcards.analysis]["meta"]["n_perm"]
    return 2000 + permutation_memory_bytes(len(input.zmaps), voxels, n_perm) // 2**20


def meta_runtime(wildcards, input, attempt):
    """``runtime`` (minutes) of a z-method meta job, times ``attempt`` (a retry asks more).
    Streaming methods: 10 minutes plus one per 200 maps, several times what they take
    (BENCHMARKS.md, "Fan-ins at 2,000 / 5,000 / 20,000 maps"). Permutation: what
    :func:`nvmeta.meta.budget.permutation_runtime_minutes` declares for these maps, this mask
    and the analysis' ``n_perm`` (its time grows with all three). The SLURM profiles leave it to
    this function (a profile's expression cannot see the mask or the config)."""
    if wildcards.method != "permutation":
        return (10 + len(input.zmaps) // 200) * attempt
    from nvmeta.meta.budget import permutation_runtime_minutes

    voxels = template_mask_voxels(input)
    n_perm = config["analyses"][wildcards.analysis]["meta"]["n_perm"]
    return permutation_runtime_minutes(len(input.zmaps), voxels, n_perm) * attempt
