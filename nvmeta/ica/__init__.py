"""Cross-study spatial ICA of an analysis' included z-maps, as nilearn's "NeuroVault cross-study ICA maps"
example, bounded in memory and restartable.

- :mod:`nvmeta.ica.matrix`: the maps x mask-voxels data matrix, built on disk block by block.
- :mod:`nvmeta.ica.pca`: randomised PCA of that matrix, streamed, for many maps.
- :mod:`nvmeta.ica.fastica`: the stabilised FastICA, sign rule, reruns and their matching.
- :mod:`nvmeta.ica.terms`: term labels from the images' texts or Neurosynth.
- :mod:`nvmeta.ica.run`: the ICA job, :func:`run_ica`.

The component figures are drawn by :mod:`nvmeta.figures.ica_maps`.
"""

from nvmeta.ica.fastica import decompose, match_components
from nvmeta.ica.matrix import build_matrix, iter_masked_maps, mask_and_affine, select_voxels
from nvmeta.ica.pca import randomized_pca
from nvmeta.ica.run import NotConverged, run_ica

__all__ = [
    "NotConverged",
    "build_matrix",
    "decompose",
    "iter_masked_maps",
    "mask_and_affine",
    "match_components",
    "randomized_pca",
    "run_ica",
    "select_voxels",
]
