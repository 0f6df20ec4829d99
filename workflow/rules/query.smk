# Resolve each analysis into its selection of images (a checkpoint: the per-image jobs are
# known only once it has run). Re-runs when the part of the config that selects images changes,
# or the content of neurovault.dump does (whatever its mtime): the params carry its sha256.

from nvmeta.neurovault.dump_files import dump_digest_or_exit
from nvmeta.select.query import analysis_query_spec, analysis_selection

# Hashed once per export and cached under .snakemake/ by size, mtime, ctime and inode (a replaced
# file always has a new ctime); an unusable dump stops here, before any job.
DUMP_SHA256 = dump_digest_or_exit(config["neurovault"].get("dump"))


localrules:
    query,


checkpoint query:
    output:
        selection=report(
            f"{ANALYSIS}/selection.tsv",
            caption="../report/selection.rst",
            category="{analysis}",
            subcategory="Selection and QC",
            labels={"result": "selection"},
        ),
        funnel=f"{ANALYSIS}/query_funnel.json",
    log:
        f"{LOGS}/query/{{analysis}}.log",
    conda:
        "../../envs/nvmeta.yaml"
    resources:
        nv_connections=1,
    params:
        spec=lambda wildcards: analysis_query_spec(
            analysis_selection(config["analyses"][wildcards.analysis]),
            config["neurovault"]["url"],
            dump=config["neurovault"].get("dump"),
            dump_sha256=DUMP_SHA256,
        ),
    script:
        "../../scripts/query.py"
