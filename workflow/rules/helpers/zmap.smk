# Helpers of the per-image z-map job (workflow/rules/zmap.smk): its optional effect-size outputs,
# its conversion settings and its batch group.

from pathlib import Path

# The z-map job writes g / var(g) only when some analysis pools effect sizes (they cost a z -> t
# inversion per image); adding such a method therefore reruns the z-map jobs once.
EFFECT_OUTPUTS = (
    {"g": f"{IMAGES}/g.nii.gz", "varg": f"{IMAGES}/varg.nii.gz"}
    if any(
        set((spec.get("meta") or {}).get("methods", [])) & set(EFFECT_METHODS)
        for spec in config["analyses"].values()
    )
    else {}
)


def _collection_of():
    """image id -> collection id over every readable selection on disk (for per-collection overrides)."""
    out = {}
    paths = [
        Path(RESULTS) / "analyses" / a / "selection.tsv" for a in config["analyses"]
    ]
    if config.get("atlas") is not None:
        paths.insert(0, Path(RESULTS) / "atlas" / "selection.tsv")
    for path in paths:
        try:
            pairs = _read_selection(str(path), path.stat().st_mtime_ns)
        except (OSError, ValueError, csv.Error):
            continue  # missing or unreadable: selection() says how to rerun its query
        out.update(pairs)
    return out


_COLLECTIONS = {}


def conversion_params(wildcards):
    """Conversion settings that apply to one image: the df rule and only *its* overrides,
    so that an override for another image does not rerun this one."""
    conv = config["conversion"]
    image_id = int(wildcards.image_id)
    if image_id not in _COLLECTIONS:
        _COLLECTIONS.update(_collection_of())
    cid = _COLLECTIONS.get(image_id, "")

    def pick(table, key):
        value = table.get(str(key), table.get(int(key)) if str(key).isdigit() else None)
        return {} if value is None else {str(key): value}

    return {
        "df": conv["df"],
        "df_images": pick(conv["df_images"], image_id),
        "n_images": pick(conv["n_images"], image_id),
        "df_collections": pick(conv["df_collections"], cid) if cid else {},
        "n_collections": pick(conv["n_collections"], cid) if cid else {},
        "design_images": pick(conv["design_images"], image_id),
        "design_collections": pick(conv["design_collections"], cid) if cid else {},
    }


def zmap_batch_group(wildcards):
    """``group`` of a z-map job: ``zmaps_<k>``, its batch (Snakemake uses groups in cluster runs
    and dry runs only). None (no group) while the plan is being made, which the z-map job waits
    for anyway, and for an image no analysis selected (a z-map asked for by path).
    """
    k = batch_plan().batch_of.get(int(wildcards.image_id))
    return None if k is None else f"zmaps_{k}"
