# Fan-in 2: cross-study spatial ICA with term labels. One rule per ICA analysis, because the
# number of component figures (and whether stability.tsv exists) comes from that analysis' config.


def _ica_component_label(terms_tsv, k):
    """Report label of component ``k``: "ICk: its top terms" (read from terms.tsv at report time)."""
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


for _analysis in analyses_with("ica"):

    rule:
        name:
            f"ica_{_analysis}"
        # with a decode block and an atlas, the labels come from decoding (decode.smk)
        input:
            **ica_decode_inputs(_analysis),
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
                labels={"result": "term table", "component": "all"},
            ),
            figures=[
                report(
                    f"{RESULTS}/analyses/{_analysis}/ica/component_{k}.png",
                    caption="../report/ica_component.rst",
                    category=_analysis,
                    subcategory="ICA",
                    labels=lambda wildcards, output, k=k: {
                        "result": "component map",
                        "component": _ica_component_label(output.terms, k),
                    },
                )
                for k in range(config["analyses"][_analysis]["ica"]["n_components"])
            ],
            stability=(
                [
                    report(
                        f"{RESULTS}/analyses/{_analysis}/ica/stability.tsv",
                        caption="../report/ica_stability.rst",
                        category=_analysis,
                        subcategory="ICA",
                        labels={"result": "stability", "component": "all"},
                    )
                ]
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
