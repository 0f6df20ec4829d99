# Decoding (analyses.<name>.decode): each result map of an analysis against the task atlas
# (workflow/rules/atlas.smk). Two jobs per analysis: the leave-out references (the atlas without
# the analysis' own maps; the ICA labels read them too), then the correlations and their null.

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
    d = f"{RESULTS}/analyses/{analysis}/decode"
    return [f"{d}/decoding.tsv", f"{d}/decoding.png", f"{d}/references.tsv"]


def ica_decode_inputs(analysis):
    """Extra inputs of an ICA job whose labels come from decoding (decode block and an atlas)."""
    if (
        config["analyses"][analysis].get("decode") is None
        or config.get("atlas") is None
    ):
        return {}
    d = f"{RESULTS}/analyses/{analysis}/decode"
    return {"references": f"{d}/references.tsv", "reference_maps": f"{d}/references"}


def decode_mem_mb(wildcards, input):
    """The pool (atlas maps x null_voxels float32, twice while it is read), the references over the
    mask (float32, and NiMARE's float32 copy per common mask) and a random draw's float64 sums.
    """
    n_pool = sum(len(m) for m in atlas_members().values())
    voxels = _meta_mask_voxels(input)
    pool = 8 * n_pool * config["atlas"]["null_voxels"]
    refs = 12 * len(input.maps) * voxels
    return 1500 + (pool + refs) // 2**20


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
