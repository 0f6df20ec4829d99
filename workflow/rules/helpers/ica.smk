# Helpers of the ICA rules (workflow/rules/ica.smk): the ica block, the decoding inputs of the
# labels, the components' report labels and the outputs of an analysis' ica block.


def analyses_with(block):
    """Names of the analyses whose config has a ``block`` block (``ica``, ...)."""
    return [a for a, spec in config["analyses"].items() if spec.get(block) is not None]


def ica_config(wildcards):
    return config["analyses"][wildcards.analysis]["ica"]


def ica_decode_inputs(analysis):
    """Extra inputs of an ICA job whose labels come from decoding (decode block and an atlas)."""
    if (
        config["analyses"][analysis].get("decode") is None
        or config.get("atlas") is None
    ):
        return {}
    d = f"{RESULTS}/analyses/{analysis}/decode"
    return {"references": f"{d}/references.tsv", "reference_maps": f"{d}/references"}


def ica_component_label(terms_tsv, k):
    """Report label of ICA component ``k``: "ICk: its top terms" (read from terms.tsv at report time)."""
    try:
        with open(terms_tsv, newline="") as fh:
            rows = [
                r
                for r in csv.DictReader(fh, delimiter="\t")
                if r["component"] == str(k)
            ]
    except (OSError, KeyError):
        rows = []
    rows.sort(key=lambda r: int(r.get("rank") or 0))
    terms = ", ".join(r["term"] for r in rows).replace("{", "").replace("}", "")
    return f"IC{k}: {terms}" if terms else f"IC{k}"


def ica_outputs(analysis):
    """Everything the ica block of an analysis produces (for all_outputs)."""
    ica = config["analyses"][analysis]["ica"]
    d = f"{RESULTS}/analyses/{analysis}/ica"
    out = [f"{d}/components.nii.gz", f"{d}/mixing.tsv", f"{d}/terms.tsv"]
    out += [f"{d}/component_{k}.png" for k in range(ica["n_components"])]
    out.append(f"{d}/stability.tsv")
    return out
