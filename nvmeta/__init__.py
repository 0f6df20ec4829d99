"""nvmeta: reproducible meta-analyses of NeuroVault statistical maps.

Kept import-free on purpose: per-image Snakemake jobs import submodules directly and
must not pay for heavy libraries they do not use.
"""

__version__ = "0.1.0"
