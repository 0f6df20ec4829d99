# The one output grid of the run: the template mask, written once so that per-image jobs read a
# plain NIfTI (no nilearn import). Changing template.mask rewrites it, which reruns every
# per-image resampling and every fan-in, and downloads nothing.


localrules:
    template,


rule template:
    input:
        # the template mask as a file input when it is a path, so that a changed mask file reruns
        lambda wildcards: (
            []
            if config["template"]["mask"] == "mni152_2mm"
            else [config["template"]["mask"]]
        ),
    output:
        TEMPLATE_MASK,
    log:
        f"{LOGS}/template.log",
    conda:
        "../../envs/nvmeta.yaml"
    params:
        spec=config["template"]["mask"],
    script:
        "../../scripts/template.py"
