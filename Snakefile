# nvmeta: NeuroVault -> query -> download -> t-to-z on one template -> QC -> meta-analysis / ICA.
# Table of contents only; the rules are in workflow/rules, the logic in the nvmeta package.
import sys

from snakemake.utils import min_version

min_version("9.16.3")

sys.path.insert(0, workflow.basedir)
from nvmeta.workflow.config import check_config_or_exit  # noqa: E402

# A config given on the command line (--configfile, --config) replaces this one instead of being
# merged into it (otherwise the demo would inherit the default analyses): `config` holds it already
# when the Snakefile starts. Not --replace-workflow-config: Snakemake 9 does not pass that flag on
# to the jobs it spawns (cluster jobs), which would then read both files and plan other batches.
if not config:

    configfile: "config/config.yaml"


# A broken config stops here, before any job, with one message per problem (no traceback).
# workflow.configfiles (public: the files of --configfile and of configfile: above, in the order
# loaded) are read again for keys given twice, which the merged config cannot show.
check_config_or_exit(
    config,
    workflow.source_path("workflow/schemas/config.schema.yaml"),
    configfiles=workflow.configfiles,
)


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/query.smk"
include: "workflow/rules/download.smk"
include: "workflow/rules/template.smk"
include: "workflow/rules/zmap.smk"
include: "workflow/rules/batches.smk"
include: "workflow/rules/qc.smk"
include: "workflow/rules/atlas.smk"
include: "workflow/rules/decode.smk"
include: "workflow/rules/meta.smk"
include: "workflow/rules/ica.smk"
include: "workflow/rules/report.smk"
include: "workflow/rules/cbma.smk"


rule all:
    default_target: True
    input:
        all_outputs,
        batch_outputs,
