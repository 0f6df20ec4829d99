"""Per-image paths as a rule declares them (``snakemake.input``), looked up by image id.

Rule scripts never rebuild an input path from another one (``Path(x).parents[2] / "images"``):
they pass the per-image input lists the rule declares, and the logic asks for an image's file by id.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path


def path_lookup(paths: Iterable[str | os.PathLike], what: str = "inputs") -> Callable[[int], Path]:
    """``image_id -> Path`` over the per-image paths a rule declares (``results/images/{id}/<file>``).

    The rule script passes ``snakemake.input.zmaps`` etc. as the rule declares them instead of rebuilding
    paths from a results directory. An image asked for that is not among ``paths`` is a clear error (the
    qc table and the rule's inputs disagree) rather than a file silently read from elsewhere.
    """
    table: dict[int, Path] = {}
    for p in paths:
        p = Path(p)
        table[int(p.parent.name)] = p

    def lookup(image_id: int) -> Path:
        try:
            return table[int(image_id)]
        except KeyError:
            raise ValueError(
                f"image {image_id} is included in qc.tsv but is not among the rule's {what} inputs"
            ) from None

    return lookup
