"""Coordinate-based meta-analysis (CBMA) of peaks extracted from an analysis' z-maps.

Entry points used by the Snakemake scripts, one module each:

- :func:`nvmeta.cbma.peaks.peaks_table` extracts the peaks of every included template-grid z-map
  and writes ``results/analyses/{a}/cbma/peaks.tsv``.
- :func:`nvmeta.cbma.estimate.run_cbma` runs one NiMARE CBMA estimator (the registry
  :data:`nvmeta.cbma.estimate.ESTIMATORS`) with NiMARE's Monte-Carlo FWE correction on those
  peaks and writes ``results/analyses/{a}/cbma/{method}/``.
- :func:`nvmeta.cbma.overlap.overlap` compares every IBMA method's FDR map with every CBMA
  method's FWE maps and writes ``results/analyses/{a}/overlap.tsv`` (+ per-cluster table and a
  figure).
- :func:`nvmeta.cbma.export.export` writes the analysis as a NiMARE studyset and Dataset.

Peaks
-----
:mod:`nvmeta.cbma.peaks`: by default the peaks of what survives each map's own corrected
inference (``cbma.peaks_from``, ``cbma.peak_correction``), as the authors would report them, from
nilearn's :func:`~nilearn.reporting.get_clusters_table` rows of each surviving cluster (at most
``cbma.max_peaks_per_cluster``, ``cbma.peak_distance`` mm apart). NiMARE has no peak extraction
of its own for statistical maps (its CBMA works from reported coordinates).

Negative peaks are their own contrast: a map's peaks with ``z < 0`` (deactivations) form a
separate experiment from its positive peaks. ``cbma.sign`` chooses which experiments enter
the CBMA (``positive`` by default); the other sign is still in ``peaks.tsv`` and in the
NiMARE export.

Experiments
-----------
With ``cbma.study: collection`` (the default) the peaks of every map of one NeuroVault
collection are pooled into one experiment (Turkeltaub et al. 2012: contrasts of one study
must not count as independent experiments); its sample sizes are the list of the maps' ``n``
(NiMARE's ALE kernel uses their mean). With ``image`` every map is its own experiment. The
sample size of a map is ``n`` from its ``qc.json`` (the one resolved sample size); ALE
leaves out, loudly, an experiment without one. A map without a peak is no experiment (its
null result cannot enter a CBMA): this is counted and reported.
"""

from __future__ import annotations

import contextlib
import gc
import os
from collections.abc import Iterator

from nvmeta.cbma.peaks import PEAK_COLUMNS, extract_peaks, peaks_table

__all__ = ["PEAK_COLUMNS", "extract_peaks", "peaks_table", "read_included"]


@contextlib.contextmanager
def _frozen_gc() -> Iterator[None]:
    # nilearn calls gc.collect() for every image it loads; freezing the heap that exists
    # before the block leaves those collections only the objects created inside it.
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def read_included(qc_tsv: str | os.PathLike):
    """Included rows of an analysis' ``qc.tsv`` (``image_id``, ``collection_id`` as int).

    Parameters
    ----------
    qc_tsv : path-like
        ``results/analyses/{a}/qc.tsv``.

    Returns
    -------
    pandas.DataFrame
        One row per included image, in file order.
    """
    import pandas as pd

    df = pd.read_csv(qc_tsv, sep="\t", dtype={"status": str})
    df = df[df["status"].astype(str).str.strip() == "included"].reset_index(drop=True)
    df["image_id"] = df["image_id"].astype(int)
    df["collection_id"] = pd.to_numeric(df["collection_id"], errors="coerce").astype("Int64")
    return df
