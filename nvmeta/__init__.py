"""nvmeta: reproducible meta-analyses of NeuroVault statistical maps.

Kept import-free on purpose: per-image Snakemake jobs import submodules directly and
must not pay for heavy libraries they do not use.
"""

__version__ = "0.1.0"


def _quiet_interrupt_in_script_jobs() -> None:
    """In a Snakemake ``script:`` job, Ctrl-C ends the job without a traceback: the Snakemake
    process says it once for the whole run (:func:`nvmeta.workflow.logs.quiet_interrupt`). Done at package
    import, the first thing every script does, so that heavy imports are covered too."""
    import os
    import sys

    # Snakemake runs a script job as ``python <workdir>/.snakemake/scripts/tmpXXXX.<name>.py``
    # (nvmeta may be imported while its preamble unpickles the job, before ``snakemake`` exists).
    script = os.path.abspath(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    if os.path.basename(os.path.dirname(os.path.dirname(script))) != ".snakemake" or not script.endswith(
        ".py"
    ):
        return
    previous = sys.excepthook

    def hook(exc_type, exc, tb):
        if not issubclass(exc_type, KeyboardInterrupt):
            previous(exc_type, exc, tb)

    sys.excepthook = hook
    # After Ctrl-C, Snakemake's job pool may still start a job it had already scheduled: that
    # process missed the SIGINT, so Snakemake would wait for it and let it print to the terminal
    # below the "interrupted" line. The interrupted Snakemake process marks its environment
    # (nvmeta.workflow.logs.quiet_interrupt), which such a late job inherits: it stops here, silently.
    if os.environ.get("NVMETA_INTERRUPTED"):
        sys.exit(130)


_quiet_interrupt_in_script_jobs()
