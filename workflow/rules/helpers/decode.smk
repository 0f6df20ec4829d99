# Helpers of the decoding rules (workflow/rules/decode.smk): the decode block, the atlas maps an
# analysis' leave-out takes out, the maps it decodes, the decode job's memory and the outputs.

from nvmeta.decode.references import leave_out_sets


def decode_config(wildcards):
    return config["analyses"][wildcards.analysis]["decode"]


def _left_out(analysis):
    """{slug: [image ids]} of the atlas maps an analysis' leave-out takes out of each term."""
    path = checkpoints.query.get(analysis=analysis).output[0]
    images, collections = leave_out_sets(
        path, config["analyses"][analysis]["decode"]["leave_out"]
    )
    out = {}
    for slug, members in atlas_members().items():
        gone = [m[0] for m in members if m[0] in images or m[1] in collections]
        if gone:
            out[slug] = gone
    return out


def decode_sources(analysis):
    """(name, path) of every result map an analysis decodes, in a fixed order."""
    spec = config["analyses"][analysis]
    d = f"{RESULTS}/analyses/{analysis}"
    out = [
        (f"meta/{m}", f"{d}/meta/{m}/z.nii.gz")
        for m in (spec["meta"] or {}).get("methods", [])
    ]
    out += [
        (f"cbma/{m}", f"{d}/cbma/{m}/z.nii.gz")
        for m in (spec.get("cbma") or {}).get("methods", [])
    ]
    if spec["ica"] is not None:
        out.append(("ica", f"{d}/ica/components.nii.gz"))
    return out


def decode_outputs(analysis):
    """Everything the decode block of an analysis produces (for all_outputs)."""
    d = f"{RESULTS}/analyses/{analysis}/decode"
    return [f"{d}/decoding.tsv", f"{d}/decoding.png", f"{d}/references.tsv"]


def decode_mem_mb(wildcards, input):
    """The pool (every term's sample.npz, twice while it is read), the references over the mask
    (float32, and NiMARE's float32 copy per common mask) and a random draw's float64 sums. Before
    the samples exist this counts none of them: Snakemake evaluates resources again once a job's
    inputs exist, before it runs or is submitted."""
    pool = sum(os.path.getsize(p) for p in input.samples if os.path.exists(p))
    refs = 12 * len(input.maps) * template_mask_voxels(input)
    return 1500 + (2 * pool + refs) // 2**20
