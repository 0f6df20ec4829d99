# The task atlas (config block `atlas:`): select NeuroVault's group maps that carry a term (by
# default the Cognitive Atlas task) with the analyses' own query, convert them with the shared
# per-image jobs, QC them, then one job per term builds its reference map. A term's job depends on
# its own maps only, so a new map of one task reruns that task's job (and the fan-in) only.

from nvmeta.decode.atlas import selection_cfg as atlas_selection_cfg
from nvmeta.decode.terms import SLUG as TERM_SLUG
from nvmeta.select.query import analysis_query_spec


include: "helpers/atlas.smk"


wildcard_constraints:
    term=TERM_SLUG.pattern,


localrules:
    atlas_query,
    atlas_terms,


checkpoint atlas_query:
    output:
        selection=report(
            f"{ATLAS}/selection.tsv",
            caption="../report/atlas_selection.rst",
            category="Task atlas",
            subcategory="Selection and QC",
            labels={"result": "selection"},
        ),
        funnel=f"{ATLAS}/query_funnel.json",
        groups=f"{ATLAS}/groups.tsv",
    log:
        f"{LOGS}/atlas/query.log",
    conda:
        "../../envs/nvmeta.yaml"
    resources:
        nv_connections=1,
    params:
        spec=lambda wildcards: analysis_query_spec(
            atlas_selection_cfg(config["atlas"]),
            config["neurovault"]["url"],
            dump=config["neurovault"].get("dump"),
            dump_sha256=DUMP_SHA256,
        ),
        group_by=lambda wildcards: config["atlas"]["group_by"],
    script:
        "../../scripts/atlas_query.py"


rule atlas_qc:
    input:
        selection=f"{ATLAS}/selection.tsv",
        qc=atlas_per_image(f"{RESULTS}/images/{{image_id}}/qc.json"),
        zmaps=atlas_per_image(f"{RESULTS}/images/{{image_id}}/zmap.nii.gz"),
        mask=TEMPLATE_MASK,
    output:
        qc=report(
            f"{ATLAS}/qc.tsv",
            caption="../report/atlas_qc.rst",
            category="Task atlas",
            subcategory="Selection and QC",
            labels={"result": "QC table"},
        ),
        funnel=report(
            f"{ATLAS}/funnel.tsv",
            caption="../report/atlas_qc.rst",
            category="Task atlas",
            subcategory="Selection and QC",
            labels={"result": "funnel"},
        ),
        consensus=f"{ATLAS}/qc_consensus.json",
    log:
        f"{LOGS}/atlas/qc.log",
    resources:
        # as rule qc (workflow/rules/qc.smk): the duplicate search's budget, then a subsample
        mem_mb=lambda wildcards, input: 1000
        + min(2 * len(input.zmaps), DUPLICATE_SEARCH_BYTES // 2**20 + 600)
        + min(len(input.zmaps), CONSENSUS_BYTES // 2**20)
        + len(input.zmaps) // 100,
        runtime=lambda wildcards, input: 10 + len(input.zmaps) // 100,
    params:
        # The atlas pools every task: a consensus across tasks says nothing about one map, so the
        # inverted-contrast and outlier rules (made for one question's maps) are off here.
        qc={**config["qc"], "inverted": "off", "outliers": "off"},
    run:
        from nvmeta.workflow.jobs import qc_job

        qc_job("atlas", input, output, log, params.qc)


checkpoint atlas_terms:
    input:
        groups=f"{ATLAS}/groups.tsv",
        qc=f"{ATLAS}/qc.tsv",
    output:
        terms=f"{ATLAS}/terms.tsv",
        members=f"{ATLAS}/members.tsv",
    log:
        f"{LOGS}/atlas/terms.log",
    conda:
        "../../envs/nvmeta.yaml"
    params:
        min_maps=lambda wildcards: config["atlas"]["min_maps"],
        min_collections=lambda wildcards: config["atlas"]["min_collections"],
    script:
        "../../scripts/atlas_terms.py"


rule atlas_term:
    input:
        # only this term's maps: a map added to another term does not rerun this job
        zmaps=lambda wildcards: [
            f"{RESULTS}/images/{m[0]}/zmap.nii.gz"
            for m in atlas_members()[wildcards.term]
        ],
        mask=TEMPLATE_MASK,
    output:
        z=f"{ATLAS}/{{term}}/z.nii.gz",
        sums=f"{ATLAS}/{{term}}/sums.npz",
        sample=f"{ATLAS}/{{term}}/sample.npz",
        summary=f"{ATLAS}/{{term}}/summary.json",
    log:
        f"{LOGS}/atlas/term_{{term}}.log",
    conda:
        "../../envs/nvmeta.yaml"
    threads: 1
    resources:
        # a few float64 vectors over the mask voxels and the term's maps x null_voxels float32
        mem_mb=lambda wildcards, input: 1000
        + len(input.zmaps) * config["atlas"]["null_voxels"] * 4 // 2**20,
        runtime=lambda wildcards, input: 10 + len(input.zmaps) // 50,
    params:
        term=lambda wildcards: atlas_term_names()[wildcards.term],
        # (image id, collection id, n) of the term's maps: a changed member reruns the job
        members=lambda wildcards: [list(m) for m in atlas_members()[wildcards.term]],
        atlas=lambda wildcards: {k: config["atlas"][k] for k in ATLAS_TERM_KEYS},
    script:
        "../../scripts/atlas_term.py"


rule atlas_table:
    input:
        terms=f"{ATLAS}/terms.tsv",
        funnel=f"{ATLAS}/query_funnel.json",
        summaries=atlas_term_files("summary.json"),
        maps=atlas_term_files("z.nii.gz"),
    output:
        table=report(
            f"{ATLAS}/atlas.tsv",
            caption="../report/atlas_table.rst",
            category="Task atlas",
            subcategory="Reference maps",
            labels={"result": "atlas table"},
        ),
        png=report(
            f"{ATLAS}/atlas.png",
            caption="../report/atlas_figure.rst",
            category="Task atlas",
            subcategory="Reference maps",
            labels={"result": "atlas figure"},
        ),
    log:
        f"{LOGS}/atlas/table.log",
    conda:
        "../../envs/nvmeta.yaml"
    resources:
        mem_mb=2000,
    script:
        "../../scripts/atlas_table.py"
