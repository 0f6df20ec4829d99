"""Decoding against a task atlas built from NeuroVault itself.

"What is this map?": a result map (a meta-analysis z, a CBMA z, an ICA component) is described by the
Cognitive Atlas tasks whose NeuroVault maps it resembles. NeuroVault's group maps that carry a task
are meta-analysed per task into reference maps (:mod:`nvmeta.decode.atlas`, one job per term, with
sums that make leave-out exact: :mod:`nvmeta.decode.sums`); an analysis is decoded against the
references without its own maps (:mod:`nvmeta.decode.references`) by spatial correlation with
NiMARE's ``CorrelationDecoder`` and judged against references built from random maps
(:mod:`nvmeta.decode.decoding`, :mod:`nvmeta.decode.null`). Term names never reach a path
(:mod:`nvmeta.decode.terms`).
"""
