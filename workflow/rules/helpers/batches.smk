# Helpers of the batch rules (workflow/rules/batches.smk): the plan's inputs, a batch's inputs and
# the tables of every batch (a target of the Snakefile's rule all).


def batch_plan_selections():
    """Every selection whose images get z-map jobs: the analyses' and the atlas' (checkpoint batch_plan)."""
    paths = [f"{RESULTS}/analyses/{a}/selection.tsv" for a in config["analyses"]]
    if config.get("atlas") is not None:
        paths.append(f"{RESULTS}/atlas/selection.tsv")
    return paths


def zmap_batch_inputs(wildcards):
    """qc.json of every image of batch ``wildcards.batch`` (the rule zmap_batch)."""
    members = batch_plan().members
    k = int(wildcards.batch)
    if k >= len(members):
        raise WorkflowError(
            f"batch {k} does not exist: {BATCH_PLAN} has {len(members)} batches "
            f"(0 to {len(members) - 1})."
        )
    return [f"{RESULTS}/images/{i}/qc.json" for i in members[k]]


def batch_outputs(wildcards=None):
    """Input function: the table of every batch (the rule zmap_batch), once the plan is made
    (apart from all_outputs, whose other targets are known before any query has run)."""
    return [f"{RESULTS}/batches/zmaps_{k}.tsv" for k in range(len(batch_plan()))]
