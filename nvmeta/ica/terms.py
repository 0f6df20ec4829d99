"""Term labels for ICA components: per-image term weights and per-component top terms.

Two sources of per-image term weights (``analyses.<name>.ica.terms``):

``"metadata"`` (default, always available)
    TF-IDF (scikit-learn ``TfidfVectorizer``, unigrams and bigrams, l2-normalised rows) over one document
    per image made of the image's own texts only (:data:`METADATA_FIELDS`): its ``name``,
    ``contrast_definition``, ``cognitive_paradigm_cogatlas`` (Cognitive Atlas task) and
    ``cognitive_contrast_cogatlas``. The free-text ``description`` and everything about the collection
    (name, description, authors, DOI) are left out: they are shared by every map of a collection or name
    people ("Maumet et al. 2016"), so they label components with author names and boilerplate instead of
    what the maps show. Words are runs of two or more letters; English stop words and
    neuroimaging boilerplate (:func:`stop_words`: "map", "contrast", "tstat", "group", "fmri", "nidm", ...)
    are dropped, and a bigram is two informative words adjacent within one field (sublinear tf).
``"neurosynth"``
    Neurosynth's decode words for each image (``data.values`` of ``GET <neurosynth_url>?neurovault=<id>``, as
    nilearn's ``fetch_neurovault(fetch_neurosynth_words=True)``), fetched through the project's polite,
    retrying client, cached per image as JSON, and vectorised with ``DictVectorizer``. Neurosynth is often
    down: after :data:`MAX_CONSECUTIVE_FAILURES` failed requests in a row (each already retried by the
    client), or when no image has any word, the source falls back to ``"metadata"`` and says so (log and the
    returned :class:`TermWeights`' ``fallback``).

Component term loadings follow nilearn's NeuroVault ICA example: negative term weights are clipped to 0
and the loadings are ``mixing.T @ term_weights`` (components x terms).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "MAX_CONSECUTIVE_FAILURES",
    "METADATA_FIELDS",
    "BOILERPLATE_WORDS",
    "TermWeights",
    "component_term_loadings",
    "decoded_labels",
    "image_term_weights",
    "indistinct_labels",
    "metadata_term_weights",
    "metadata_text",
    "neurosynth_term_weights",
    "stop_words",
    "top_terms",
]

#: Image record fields that make up an image's document (in this order): its own texts only, never the
#: collection's or a description (see the module docstring).
METADATA_FIELDS = (
    "name",
    "contrast_definition",
    "cognitive_paradigm_cogatlas",
    "cognitive_contrast_cogatlas",
)

#: Uninformative neuroimaging words removed besides scikit-learn's English stop words.
BOILERPLATE_WORDS = frozenset(
    """
    map maps contrast contrasts image images tstat tstats zstat zstats tmap zmap spmt spm fsl afni cope copes
    con cons varcope beta betas group groups level levels fmri mri bold nidm results result statistic statistics
    statistical stat stats vs versus minus greater mean average effect effects main analysis analyses
    subject subjects participant participants study studies data dataset task tasks condition conditions
    session sessions run runs nii gz zip pack file files collection collections neurovault activation
    activations activity uncorrected corrected thresholded unthresholded threshold one two sample samples
    ttest test tests paired unpaired baseline glm model models design regressor regressors parameter
    parameters estimate estimates whole brain brains signal first second higher lower positive negative
    difference differences masked mask region regions roi voxel voxelwise cluster clusters fwe fdr
    paradigm none null na nan unknown other et al derived shared dataset datasets standard error
    """.split()
)

# Text is cut into segments at punctuation (fields are joined by ". "), so no bigram spans two fields.
_SEGMENT_SPLIT = re.compile(r"[.;:,!?()\[\]{}|/\\\"'\n\r\t]+")
_TOKEN = re.compile(r"[^\W_]+")
_WORD = re.compile(r"[^\W\d_]{2,}")


class _Analyzer:
    """Unigrams and bigrams of informative words.

    A word is a run of two or more letters that is not a stop word. A bigram is two informative words that
    are adjacent in the text (same segment, nothing between them), so "motor vs rest" gives "motor" and
    "rest" but no "motor rest", and "working-memory task" gives "working memory" (a word repeated is no
    bigram).
    """

    def __init__(self, stops: frozenset[str]):
        self.stops = stops

    def __call__(self, doc: str) -> list[str]:
        out: list[str] = []
        for segment in _SEGMENT_SPLIT.split(doc.lower()):
            prev = None
            for token in _TOKEN.findall(segment):
                if _WORD.fullmatch(token) and token not in self.stops:
                    out.append(token)
                    if prev is not None and prev != token:
                        out.append(f"{prev} {token}")
                    prev = token
                else:
                    prev = None
        return out


def stop_words() -> frozenset[str]:
    """English stop words (scikit-learn's ``ENGLISH_STOP_WORDS``) plus :data:`BOILERPLATE_WORDS`."""
    from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

    return frozenset(ENGLISH_STOP_WORDS) | BOILERPLATE_WORDS


#: Failed Neurosynth requests in a row after which Neurosynth is taken as down.
MAX_CONSECUTIVE_FAILURES = 3


@dataclass
class TermWeights:
    """Per-image term weights.

    Attributes
    ----------
    matrix : scipy.sparse matrix or numpy.ndarray, shape (n_maps, n_terms)
        Non-negative term weights, rows in the order of the image ids given.
    vocabulary : numpy.ndarray of str, shape (n_terms,)
    source : str
        Source actually used ("metadata" or "neurosynth").
    requested : str
        Source asked for in the config.
    fallback : str or None
        Why the requested source was not used (None when it was).
    warnings : list of str
        Other problems (missing metadata files, images without Neurosynth words, ...).
    info : dict
        Counters (e.g. Neurosynth images fetched / cached / without words / failed).
    """

    matrix: Any
    vocabulary: np.ndarray
    source: str
    requested: str
    fallback: str | None = None
    warnings: list[str] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)


def _clean(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float) and value != value:  # NaN
        return ""
    text = str(value).strip()
    return "" if text.lower() in {"none", "null", "n/a", "nan"} else text


def metadata_text(record: dict | None) -> str:
    """Return the document of one image: its :data:`METADATA_FIELDS` (name, contrast, Cognitive Atlas task
    and contrast), never its collection's texts.

    Parameters
    ----------
    record : dict or None
        The content of ``results/images/{id}/metadata.json`` (image record + ``"nvmeta"`` block).

    Returns
    -------
    str
        Non-empty fields joined by ". " (empty string when there is no record).
    """
    if not record:
        return ""
    parts = [_clean(record.get(key)) for key in METADATA_FIELDS]
    return ". ".join(p for p in parts if p)


def metadata_term_weights(documents: Sequence[str]):
    """TF-IDF weights of unigrams and bigrams of ``documents``.

    Parameters
    ----------
    documents : sequence of str
        One document per image (see :func:`metadata_text`).

    Returns
    -------
    matrix : scipy.sparse.csr_matrix, shape (n_docs, n_terms), float64
        l2-normalised TF-IDF rows (all zero for an empty document).
    vocabulary : numpy.ndarray of str
        Terms, sorted. Empty when no document has an informative word.
    """
    import scipy.sparse as sp
    from sklearn.feature_extraction.text import TfidfVectorizer

    vectorizer = TfidfVectorizer(analyzer=_Analyzer(stop_words()), sublinear_tf=True, dtype=np.float64)
    try:
        matrix = vectorizer.fit_transform(list(documents))
    except ValueError:  # empty vocabulary: nothing but stop words / no text at all
        return sp.csr_matrix((len(documents), 0)), np.asarray([], dtype=str)
    return matrix.tocsr(), np.asarray(vectorizer.get_feature_names_out(), dtype=str)


def _is_not_found(exc: BaseException) -> bool:
    try:
        from nvmeta.neurovault import NotFound
    except ImportError:  # pragma: no cover - the client module is part of the package
        return type(exc).__name__ == "NotFound"
    return isinstance(exc, NotFound)


def _words_from_reply(reply: Any) -> dict[str, float]:
    if not isinstance(reply, dict):
        raise ValueError("Neurosynth reply is not a JSON object")
    data = reply.get("data")
    values = data.get("values") if isinstance(data, dict) else None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ValueError("Neurosynth reply: data.values is not an object")
    words = {}
    for term, weight in values.items():
        try:
            w = float(weight)
        except (TypeError, ValueError):
            continue
        if np.isfinite(w):
            words[str(term)] = w
    return words


def neurosynth_term_weights(
    image_ids: Sequence[int],
    client: Any,
    url: str,
    cache_path_for: Callable[[int], Path] | None = None,
    logger: logging.Logger | None = None,
    max_consecutive_failures: int = MAX_CONSECUTIVE_FAILURES,
) -> tuple[Any, np.ndarray, dict[str, Any]]:
    """Neurosynth decode words of each image, as a term matrix.

    Parameters
    ----------
    image_ids : sequence of int
    client : object
        Has ``get_json_url(url, params)`` (``nvmeta.neurovault.make_client(...)``). May be None when every image is
        cached.
    url : str
        Decode endpoint, e.g. ``"https://neurosynth.org/api/decode/"``; requested with ``?neurovault=<id>``.
    cache_path_for : callable, optional
        ``image_id -> Path`` of the per-image JSON cache. A successful reply's words are stored there
        (``{"image_id", "url", "values"}``) and read back instead of asking again.
    logger : logging.Logger, optional
        Defaults to this module's logger.
    max_consecutive_failures : int
        Failed requests in a row (not counting 404 = "no words for this image") after which Neurosynth is
        taken as down and no more requests are made.

    Returns
    -------
    matrix : scipy.sparse.csr_matrix, shape (n_images, n_terms)
        Raw decode weights (may be negative; clipped later). Rows of images without words are zero.
    vocabulary : numpy.ndarray of str (sorted)
    info : dict
        ``n_cached``, ``n_fetched``, ``n_no_words``, ``n_failed``, ``down`` (bool), ``errors`` (first few
        error messages).
    """
    from sklearn.feature_extraction import DictVectorizer

    from nvmeta.io import read_json, write_json

    log = logger if logger is not None else logging.getLogger(__name__)
    info: dict[str, Any] = {
        "n_cached": 0,
        "n_fetched": 0,
        "n_no_words": 0,
        "n_failed": 0,
        "down": False,
        "errors": [],
    }
    rows: list[dict[str, float]] = []
    consecutive = 0
    for image_id in image_ids:
        image_id = int(image_id)
        words: dict[str, float] | None = None
        cache = cache_path_for(image_id) if cache_path_for is not None else None
        if cache is not None and cache.is_file():
            try:
                words = {str(k): float(v) for k, v in read_json(cache)["values"].items()}
                info["n_cached"] += 1
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                words = None  # unreadable cache entry: fetch again
        if words is None and not info["down"] and client is not None:
            try:
                reply = client.get_json_url(url, params={"neurovault": image_id})
                words = _words_from_reply(reply)
                consecutive = 0
                info["n_fetched"] += 1
                if cache is not None:
                    write_json(cache, {"image_id": image_id, "url": url, "values": words})
            except Exception as exc:  # any failure is tolerated: Neurosynth is optional
                if _is_not_found(exc):
                    consecutive = 0
                    words = {}
                else:
                    consecutive += 1
                    info["n_failed"] += 1
                    if len(info["errors"]) < 5:
                        info["errors"].append(f"image {image_id}: {type(exc).__name__}: {exc}")
                    log.warning("neurosynth: image %s: %s", image_id, exc)
                    if consecutive >= max_consecutive_failures:
                        info["down"] = True
                        log.warning(
                            "neurosynth: %d failed requests in a row; taking Neurosynth as down", consecutive
                        )
        if not words:
            info["n_no_words"] += 1
            words = {}
        rows.append(words)
    vectorizer = DictVectorizer(dtype=np.float64, sparse=True, sort=True)
    matrix = vectorizer.fit_transform(rows).tocsr()
    vocabulary = np.asarray(vectorizer.get_feature_names_out(), dtype=str)
    return matrix, vocabulary, info


def _read_record(path: Path) -> dict | None:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def image_term_weights(
    image_ids: Sequence[int],
    metadata_path_for: Callable[[int], Path],
    cfg: dict,
    client_factory: Callable[[], Any] | None = None,
    cache_path_for: Callable[[int], Path] | None = None,
    logger: logging.Logger | None = None,
) -> TermWeights:
    """Per-image term weights from the source configured in ``cfg["terms"]``, with the metadata fallback.

    Parameters
    ----------
    image_ids : sequence of int
        Images in mixing-matrix order.
    metadata_path_for : callable
        ``image_id -> Path`` of ``metadata.json``.
    cfg : dict
        The analysis' ``ica`` block (keys ``terms``, ``neurosynth_url``).
    client_factory : callable, optional
        Returns a client with ``get_json_url`` (needed for ``terms="neurosynth"`` unless all is cached).
    cache_path_for : callable, optional
        ``image_id -> Path`` of the per-image Neurosynth cache (default: ``neurosynth.json`` next to
        ``metadata.json``).
    logger : logging.Logger, optional
        Defaults to this module's logger.

    Returns
    -------
    TermWeights
        Non-negative (clipped) term weights and which source was used.
    """
    import scipy.sparse as sp

    log = logger if logger is not None else logging.getLogger(__name__)
    requested = str(cfg["terms"])
    warnings: list[str] = []
    info: dict[str, Any] = {}
    fallback = None
    if requested not in {"metadata", "neurosynth"}:
        raise ValueError(f"ica.terms must be 'metadata' or 'neurosynth', not {requested!r}")

    if requested == "neurosynth":
        url = str(cfg["neurosynth_url"])
        if cache_path_for is None:

            def cache_path_for(image_id: int) -> Path:
                return Path(metadata_path_for(image_id)).parent / "neurosynth.json"

        client = None
        try:
            client = client_factory() if client_factory is not None else None
        except Exception as exc:  # a broken client set-up must not fail the ICA
            warnings.append(f"neurosynth client could not be created: {exc}")
        matrix, vocabulary, info = neurosynth_term_weights(image_ids, client, url, cache_path_for, logger=log)
        n_with = len(image_ids) - info["n_no_words"]
        if info["down"]:
            fallback = (
                f"Neurosynth is down ({info['n_failed']} failed requests, last errors: "
                f"{'; '.join(info['errors'][-2:])}); term labels from metadata instead"
            )
        elif n_with == 0:
            reason = "no client available" if client is None else "no image has Neurosynth words"
            fallback = f"Neurosynth gave no words ({reason}); term labels from metadata instead"
        else:
            if info["n_failed"]:
                warnings.append(f"neurosynth: {info['n_failed']} requests failed; those images have no words")
            if info["n_no_words"]:
                warnings.append(f"neurosynth: {info['n_no_words']} of {len(image_ids)} images have no words")
            matrix = matrix.copy()
            matrix.data[matrix.data < 0] = 0
            matrix.eliminate_zeros()
            return TermWeights(matrix, vocabulary, "neurosynth", requested, None, warnings, info)
        log.warning("ICA terms: %s", fallback)

    documents = []
    missing = 0
    for image_id in image_ids:
        record = _read_record(metadata_path_for(int(image_id)))
        if record is None:
            missing += 1
        documents.append(metadata_text(record))
    if missing:
        warnings.append(f"metadata: {missing} images without a readable metadata.json")
    matrix, vocabulary = metadata_term_weights(documents)
    if vocabulary.size == 0:
        warnings.append("metadata: no informative words in any image's text; components have no term labels")
    matrix = sp.csr_matrix(matrix)
    matrix.data[matrix.data < 0] = 0
    return TermWeights(matrix, vocabulary, "metadata", requested, fallback, warnings, info)


def component_term_loadings(mixing: np.ndarray, term_matrix: Any) -> np.ndarray:
    """Term loadings of each component: ``mixing.T @ max(term_weights, 0)``.

    Parameters
    ----------
    mixing : numpy.ndarray, shape (n_maps, n_components)
    term_matrix : scipy.sparse matrix or numpy.ndarray, shape (n_maps, n_terms)

    Returns
    -------
    numpy.ndarray, shape (n_components, n_terms), float64
    """
    import scipy.sparse as sp

    mixing = np.asarray(mixing, dtype=np.float64)
    if sp.issparse(term_matrix):
        weights = sp.csr_matrix(term_matrix, dtype=np.float64, copy=True)
        weights.data[weights.data < 0] = 0
        return np.asarray(weights.T.dot(mixing)).T
    weights = np.clip(np.asarray(term_matrix, dtype=np.float64), 0, None)
    return mixing.T @ weights


def top_terms(loadings: np.ndarray, vocabulary: np.ndarray, n_terms: int) -> list[list[tuple[str, float]]]:
    """Top ``n_terms`` terms of each component: its largest positive loadings, largest first.

    Components are sign-flipped so that their larger tail is positive, so a positive loading means the term
    is used by the images that express the component's positive pattern (nilearn's example takes the largest
    values the same way). Terms with a zero or negative loading are never shown: when every loading of a
    component is negative (e.g. every image has the same text and the component's image loadings sum to
    a negative number) the component gets no label rather than the least negative, i.e. least used, terms.
    Ties are broken by the term's alphabetical order, so the result is deterministic.

    Returns
    -------
    list of list of (term, weight)
    """
    out = []
    vocabulary = np.asarray(vocabulary, dtype=str)
    for row in np.atleast_2d(loadings):
        if row.size == 0:
            out.append([])
            continue
        order = np.lexsort((vocabulary, -row))  # by -weight, then term
        picked = [(str(vocabulary[i]), float(row[i])) for i in order if row[i] > 0][:n_terms]
        out.append(picked)
    return out


def indistinct_labels(tops: Sequence[Sequence[tuple[str, float]]]) -> str | None:
    """A warning when the term labels cannot tell the components apart, else None.

    When every included image has the same text (one collection uploading the same contrast many times,
    as the demo's 21 pain maps), each component's term loadings are proportional to the same vector and
    all components get the same top terms: the labels then describe the images, not the components.
    """
    labelled = [tuple(t for t, _ in picked) for picked in tops if picked]
    if len(labelled) > 1 and len(set(labelled)) == 1:
        return (
            f"every labelled component has the same top terms ({', '.join(labelled[0])}): the images' texts do "
            "not tell the components apart, the labels describe the whole selection"
        )
    return None


def decoded_labels(
    tops: list[list[tuple[str, float]]], labeler: Callable[[Any], Any] | None, volume: Any
) -> tuple[list[list[tuple[str, float]]], list[str], str | None]:
    """Component labels from decoding against the task atlas, the image-text ``tops`` as the fallback.

    Parameters
    ----------
    tops : list
        The image-text labels (:func:`top_terms`).
    labeler : callable or None
        ``volume -> [[(term, r), ...] per component]`` or None (:func:`nvmeta.decode.decoding.top_labels`).
    volume : ndarray
        The components (X, Y, Z, k).

    Returns
    -------
    (list, list of str, str or None)
        The labels, each component's label source (``"atlas"`` or ``"metadata"``) and a note when the
        fallback was used.
    """
    if labeler is None:
        return tops, ["metadata"] * len(tops), None
    decoded = labeler(volume)
    if decoded is None:
        note = "labels from the images' texts: no atlas term is decodable for this analysis (decode/references.tsv)"
        return tops, ["metadata"] * len(tops), note
    out, sources = [], []
    for k, fallback in enumerate(tops):
        got = decoded[k] if k < len(decoded) else []
        out.append(got if got else fallback)
        sources.append("atlas" if got else "metadata")
    missing = [k for k, s in enumerate(sources) if s == "metadata"]
    note = (
        f"components {missing} correlate positively with no atlas term: image-text labels"
        if missing
        else None
    )
    return out, sources, note
