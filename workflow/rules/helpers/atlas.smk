# Helpers of the task atlas rules (workflow/rules/atlas.smk): the atlas' selection, its terms'
# names and the outputs of the atlas block. What decoding reads of the atlas too (atlas_members,
# atlas_term_files) is in common.smk.


def atlas_ids():
    """Image ids of the atlas' selection, once its query checkpoint has run."""
    path = checkpoints.atlas_query.get().output.selection
    try:
        return [i for i, _ in _read_selection(path, os.stat(path).st_mtime_ns)]
    except (OSError, ValueError, csv.Error) as exc:
        raise WorkflowError(
            f"{path} is unreadable ({exc}). Fix: run the same command again with "
            "--forcerun atlas_query."
        )


def atlas_per_image(pattern):
    return lambda wildcards: [pattern.format(image_id=i) for i in atlas_ids()]


def atlas_term_names():
    import pandas as pd

    path = checkpoints.atlas_terms.get().output.terms
    df = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    return dict(zip(df["slug"], df["term"]))


def atlas_outputs():
    """What the atlas block produces (for all_outputs)."""
    if config.get("atlas") is None:
        return []
    # query_funnel.json and groups.tsv too: a checkpoint with an output missing then runs again
    # instead of leaving its dependents unresolved
    names = ("selection.tsv", "query_funnel.json", "groups.tsv", "qc.tsv", "funnel.tsv")
    return [f"{ATLAS}/{name}" for name in (*names, "atlas.tsv", "atlas.png")]


#: The atlas keys a term's reference depends on (min_maps / min_collections decide which terms
#: exist, in checkpoint atlas_terms, and leave the references themselves alone).
ATLAS_TERM_KEYS = ["method", "min_fraction", "null_voxels", "random_state"]
