# Fan-in 2: cross-study spatial ICA with term labels. One rule per ICA analysis, because the
# number of component figures (and whether stability.tsv exists) comes from that analysis' config.

for _analysis in analyses_with("ica"):

    rule:
        name:
            f"ica_{_analysis}"
        input:
            qc=f"{RESULTS}/analyses/{_analysis}/qc.tsv",
            zmaps=per_image(f"{RESULTS}/images/{{image_id}}/zmap.nii.gz", _analysis),
            metadata=per_image(
                f"{RESULTS}/images/{{image_id}}/metadata.json", _analysis
            ),
            mask=TEMPLATE_MASK,
        output:
            [
                f"{RESULTS}/analyses/{_analysis}/ica/{name}"
                for name in ("components.nii.gz", "mixing.tsv", "summary.json")
            ],
            terms=report(
                f"{RESULTS}/analyses/{_analysis}/ica/terms.tsv",
                caption="../report/ica_terms.rst",
                category=_analysis,
                subcategory="ICA",
                labels={"analysis": _analysis, "table": "component terms"},
            ),
            figures=[
                report(
                    f"{RESULTS}/analyses/{_analysis}/ica/component_{k}.png",
                    caption="../report/ica_component.rst",
                    category=_analysis,
                    subcategory="ICA",
                    labels={"analysis": _analysis, "figure": f"IC{k}"},
                )
                for k in range(config["analyses"][_analysis]["ica"]["n_components"])
            ],
            stability=(
                [f"{RESULTS}/analyses/{_analysis}/ica/stability.tsv"]
                if config["analyses"][_analysis]["ica"]["n_runs"] > 1
                else []
            ),
        log:
            f"{LOGS}/ica/{_analysis}.log",
        conda:
            "../../envs/nvmeta.yaml"
        threads: 2
        resources:
            # the maps x voxels float32 matrix is memory-mapped; FastICA works on a reduced copy.
            mem_mb=lambda wildcards, input: 2000 + len(input.zmaps),
            runtime=lambda wildcards, input: 10 + len(input.zmaps) // 50,
        params:
            ica=config["analyses"][_analysis]["ica"],
            analysis=_analysis,
        script:
            "../../scripts/ica.py"
