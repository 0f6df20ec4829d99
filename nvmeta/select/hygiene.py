"""Selection hygiene for atlas-scale selections: leave out what is not independent research data.

Facts of the real NeuroVault export (February 2024) that a selection over all of NeuroVault meets:

* **Neuroscout's automated uploads**: about 289,000 statistic maps, half of the export, from one
  owner (``owner`` 5761 on collection records; ``owner_id`` in the dump): the same models fitted
  automatically to public datasets, not studies.
* **"temporary collection" uploads**: NeuroVault's own "upload a map to decode / to NeuroPower"
  pages put each map into a collection named ``"<username>'s temporary collection"``; NeuroVault
  itself hides such collections from its public listings (``name__endswith="temporary
  collection"`` in its collection views).
* **Collections of more than 1,000 items**: bulk uploads (per-subject or automated maps), where
  one upload would outweigh every other study of its task.
* **The task key ``None``**: the literal Cognitive Atlas id ``None`` is NeuroVault's "None / Other"
  task (about 300,000 maps), i.e. no task at all.

:data:`COLLECTION_TERMS` and :data:`IMAGE_TERMS` are ordinary filter terms that leave these out.
:func:`with_hygiene` puts them *under* a selection's own terms (a term of the user's on the same
field replaces the hygiene term), so they run through the query like any other term and the query's
funnel (``query_funnel.json``) counts what each one rejected. The atlas applies them by default
(``atlas.hygiene``), an analysis when asked (``analyses.<name>.hygiene: true``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["COLLECTION_TERMS", "IMAGE_TERMS", "NEUROSCOUT_OWNER", "MAX_COLLECTION_IMAGES", "with_hygiene"]

#: NeuroVault user id of Neuroscout, whose automated uploads are half of the export.
NEUROSCOUT_OWNER = 5761
#: Collections holding more than this many maps are left out.
MAX_COLLECTION_IMAGES = 1000

#: Collection terms: not Neuroscout's, not a "temporary collection", at most 1,000 maps.
COLLECTION_TERMS: dict[str, Any] = {
    "owner": {"ne": NEUROSCOUT_OWNER},
    # anchored at the start by re.match: a name that does not end with "temporary collection"
    "name": {"pattern": r"(?is)(?!.*temporary collection\s*$)"},
    "number_of_images": {"le": MAX_COLLECTION_IMAGES},
}
#: Image terms: not the "None / Other" task (Cognitive Atlas id ``None``).
IMAGE_TERMS: dict[str, Any] = {"cognitive_paradigm_cogatlas_id": {"ne": "None"}}


def with_hygiene(selection_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of a selection config (an analysis or the atlas' query) with the hygiene terms under its own.

    Explicit selections (``image_ids`` / ``collection_ids``) are returned unchanged: their filters are
    ignored anyway (as in nilearn).
    """
    out = dict(selection_cfg)
    if out["image_ids"] or out["collection_ids"]:
        return out
    out["image_terms"] = {**IMAGE_TERMS, **out["image_terms"]}
    out["collection_terms"] = {**COLLECTION_TERMS, **out["collection_terms"]}
    return out
