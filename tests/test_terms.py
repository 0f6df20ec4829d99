"""Term weights for ICA labels (nvmeta.ica.terms): metadata TF-IDF and Neurosynth words via the fixture server."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from nvmeta.ica import terms as terms
from nvmeta.workflow.config import defaults


def write_metadata(root: Path, records: dict[int, dict]) -> None:
    for iid, rec in records.items():
        d = root / str(iid)
        d.mkdir(parents=True, exist_ok=True)
        (d / "metadata.json").write_text(json.dumps(rec))


def meta_path(root: Path):
    return lambda i: root / str(i) / "metadata.json"


# --------------------------------------------------------------------------------------------------
# metadata TF-IDF
# --------------------------------------------------------------------------------------------------
def test_metadata_text_image_fields_only():
    rec = {
        "name": "Finger tapping",
        "contrast_definition": "left vs right",
        "cognitive_paradigm_cogatlas": "motor fMRI task paradigm",
        "cognitive_contrast_cogatlas": "finger tapping > rest",
        "description": "Uploaded by Maumet for the NIDM pack",
        "map_type": "T map",  # not a text field
        "authors": "Smith J",
        "nvmeta": {
            "collection": {"name": "Motor study", "description": "Shared by Maumet", "authors": "A, B"}
        },
    }
    assert terms.metadata_text(rec) == (
        "Finger tapping. left vs right. motor fMRI task paradigm. finger tapping > rest"
    )
    assert terms.metadata_text(None) == ""
    assert terms.metadata_text({"name": "x", "nvmeta": {"collection": None}}) == "x"


def test_labels_never_come_from_authors_or_collection_text(tmp_path):
    """Planted metadata: author names and collection boilerplate shared by every image (as the demo's
    collection 1425, "Maumet et al. 2016") must not reach the vocabulary; the image's own name, contrast,
    Cognitive Atlas task and contrast do."""
    boiler = {
        "name": "NIDM-Results pain dataset: 21 group-level pain studies",
        "description": "21 pain studies shared as NIDM-Results packs (Maumet et al. 2016).",
        "authors": "Maumet C, Auer T, Bowring A",
        "owner_name": "delavega4",
    }
    fields = [
        ("heat pain", "hot vs warm", "pain monitor task", "noxious heat"),
        ("finger tapping", "left vs right", "motor sequence task", "finger movement"),
        ("tones", "loud vs soft", "auditory oddball task", "loudness"),
    ]
    records = {
        i + 1: {
            "name": name,
            "contrast_definition": contrast,
            "cognitive_paradigm_cogatlas": task,
            "cognitive_contrast_cogatlas": cogcon,
            "description": "Group-level t-map of study by Bowring, contributed by delavega4",
            "nvmeta": {"collection": boiler},
        }
        for i, (name, contrast, task, cogcon) in enumerate(fields)
    }
    write_metadata(tmp_path, records)
    tw = terms.image_term_weights([1, 2, 3], meta_path(tmp_path), {**defaults("ica"), "terms": "metadata"})
    vocab = set(tw.vocabulary)
    for word in ("maumet", "auer", "bowring", "delavega", "nidm", "studies", "dataset", "shared", "packs"):
        assert not any(word in term for term in vocab), (word, sorted(vocab))
    assert {"heat", "noxious heat", "finger tapping", "sequence", "oddball", "loudness", "hot"} <= vocab
    # each image's row holds only its own words
    dense = tw.matrix.toarray()
    col = {t: j for j, t in enumerate(tw.vocabulary)}
    assert dense[0, col["noxious"]] > 0 and dense[1, col["noxious"]] == 0 and dense[2, col["noxious"]] == 0
    # a component loading on image 2 (the motor one) is labelled by the motor texts
    mixing = np.array([[0.1], [2.0], [-0.5]])
    top = terms.top_terms(terms.component_term_loadings(mixing, tw.matrix), tw.vocabulary, 3)[0]
    assert all(
        t
        in {
            "finger",
            "tapping",
            "finger tapping",
            "left",
            "right",
            "motor",
            "sequence",
            "motor sequence",
            "movement",
            "finger movement",
            "left right",
        }
        for t, _ in top
    ), top


def test_analyzer_bigrams_within_fields_without_stop_words():
    analyze = terms._Analyzer(terms.stop_words())
    got = analyze(
        "Working-memory task (2-back vs 0-back). Motor localizer. motor vs rest; zstat1 pain_01 level"
    )
    assert got == [
        "working",
        "memory",
        "working memory",
        "motor",
        "localizer",
        "motor localizer",
        "motor",
        "rest",
        "pain",
    ]
    assert {
        "map",
        "contrast",
        "tstat",
        "zstat",
        "group",
        "level",
        "fmri",
        "nidm",
        "results",
        "statistic",
        "vs",
    } <= terms.stop_words()
    assert "the" in terms.stop_words()


def test_tfidf_against_hand_computation():
    docs = ["motor motor tapping", "auditory tones", "motor. auditory", "the map of a group"]
    matrix, vocab = terms.metadata_term_weights(docs)
    vocab = vocab.tolist()
    assert vocab == ["auditory", "auditory tones", "motor", "motor tapping", "tapping", "tones"]
    tokens = [
        ["motor", "motor", "tapping", "motor tapping"],
        ["auditory", "tones", "auditory tones"],
        ["motor", "auditory"],
        [],
    ]
    n = len(docs)
    df = {t: sum(t in d for d in tokens) for t in vocab}
    ref = np.zeros((n, len(vocab)))
    for i, d in enumerate(tokens):
        for t in set(d):
            tf = 1 + math.log(d.count(t))  # sublinear tf
            idf = math.log((1 + n) / (1 + df[t])) + 1  # smooth idf
            ref[i, vocab.index(t)] = tf * idf
        if ref[i].any():
            ref[i] /= np.linalg.norm(ref[i])
    np.testing.assert_allclose(matrix.toarray(), ref, rtol=1e-12)


def test_tfidf_empty_vocabulary():
    matrix, vocab = terms.metadata_term_weights(["the map", "", "group level results"])
    assert matrix.shape == (3, 0) and vocab.size == 0


def test_image_term_weights_metadata(tmp_path):
    write_metadata(
        tmp_path,
        {
            1: {"name": "motor localizer", "nvmeta": {"collection": {"name": "Study A"}}},
            2: {"name": "auditory localizer", "nvmeta": {"collection": {"name": "Study A"}}},
        },
    )
    tw = terms.image_term_weights([2, 1, 3], meta_path(tmp_path), {**defaults("ica"), "terms": "metadata"})
    assert tw.source == "metadata" and tw.requested == "metadata" and tw.fallback is None
    assert tw.matrix.shape[0] == 3
    assert tw.warnings == ["metadata: 1 images without a readable metadata.json"]
    row = dict(zip(tw.vocabulary, tw.matrix.toarray()[0], strict=True))
    assert row["auditory"] > 0 and row["motor"] == 0  # row order = image order given
    assert not tw.matrix.toarray()[2].any()


# --------------------------------------------------------------------------------------------------
# loadings and top terms
# --------------------------------------------------------------------------------------------------
def test_indistinct_labels_are_said():
    same = [[("pain", 0.3), ("heat", 0.1)], [("pain", 0.2), ("heat", 0.05)], []]
    assert "do not tell the components apart" in terms.indistinct_labels(same)
    assert terms.indistinct_labels([[("pain", 0.3)], [("motor", 0.2)]]) is None
    assert terms.indistinct_labels([[("pain", 0.3)], []]) is None


def test_component_term_loadings_clip_and_product():
    rng = np.random.default_rng(0)
    mixing = rng.normal(size=(6, 3))
    w = rng.normal(size=(6, 5))
    ref = np.zeros((3, 5))
    for k in range(3):
        for t in range(5):
            ref[k, t] = sum(mixing[i, k] * max(w[i, t], 0.0) for i in range(6))
    np.testing.assert_allclose(terms.component_term_loadings(mixing, w), ref, rtol=1e-12)
    np.testing.assert_allclose(terms.component_term_loadings(mixing, sp.csr_matrix(w)), ref, rtol=1e-12)
    assert (w < 0).any()  # the input is not modified
    assert (sp.csr_matrix(w).data < 0).any()


def test_top_terms_by_loading_nonzero_and_deterministic_ties():
    vocab = np.array(["b", "a", "c", "d"])
    loadings = np.array([[1.0, 1.0, 0.5, -2.0], [0.0, -1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    # largest positive first (nilearn's example takes argsort(...)[-3:]); zero or negative never shown: a
    # component whose loadings are all negative gets no label, not its least used terms
    assert terms.top_terms(loadings, vocab, 3) == [[("a", 1.0), ("b", 1.0), ("c", 0.5)], [], []]
    assert terms.top_terms(np.zeros((2, 0)), np.array([], dtype=str), 3) == [[], []]


# --------------------------------------------------------------------------------------------------
# Neurosynth via the fixture server
# --------------------------------------------------------------------------------------------------
REPLIES = {
    11: {"data": {"values": {"pain": 0.31, "noxious": 0.2, "reward": -0.1}}},
    12: {"data": {"values": {"reward": 0.25, "pain": 0.05}}},
    14: {"data": {"values": {}}},
}


@pytest.fixture()
def ns_server(tmp_path):
    from nvmeta.neurovault.layout import write_snapshot
    from nvmeta.testing.server import FixtureServer

    root = write_snapshot(tmp_path / "snap", images=[], collections=[], neurosynth=REPLIES)
    with FixtureServer(root) as srv:
        yield srv


def client_for(srv):
    from nvmeta.neurovault import make_client

    return make_client({**defaults("neurovault"), "url": srv.url, "retries": 1, "backoff": 0.0, "timeout": 5})


def decode_requests(srv):
    return [r for r in srv.requests if r.startswith("/api/decode/")]


def test_neurosynth_words_matrix_and_cache(ns_server, tmp_path):
    cache = tmp_path / "cache"
    ids = [11, 12, 13, 14]  # 13: 404 (no decode), 14: empty values
    matrix, vocab, info = terms.neurosynth_term_weights(
        ids, client_for(ns_server), ns_server.url + "decode/", lambda i: cache / f"{i}.json"
    )
    assert vocab.tolist() == ["noxious", "pain", "reward"]
    np.testing.assert_allclose(matrix.toarray(), [[0.2, 0.31, -0.1], [0, 0.05, 0.25], [0, 0, 0], [0, 0, 0]])
    assert info == {
        "n_cached": 0,
        "n_fetched": 3,
        "n_no_words": 2,
        "n_failed": 0,
        "down": False,
        "errors": [],
    }
    assert decode_requests(ns_server) == [f"/api/decode/?neurovault={i}" for i in ids]
    assert sorted(p.name for p in cache.iterdir()) == ["11.json", "12.json", "14.json"]
    assert json.loads((cache / "11.json").read_text())["values"] == REPLIES[11]["data"]["values"]

    # second time: from the cache (only the 404 image is asked again), even with the server down
    ns_server.add_fault(r"^/api/decode/", "down")
    matrix2, vocab2, info2 = terms.neurosynth_term_weights(
        ids, client_for(ns_server), ns_server.url + "decode/", lambda i: cache / f"{i}.json"
    )
    np.testing.assert_array_equal(matrix2.toarray(), matrix.toarray())
    assert info2["n_cached"] == 3 and info2["n_failed"] == 1 and not info2["down"]


def test_image_term_weights_neurosynth_clips_negatives(ns_server, tmp_path):
    write_metadata(tmp_path / "img", {i: {"name": "pain"} for i in (11, 12)})
    tw = terms.image_term_weights(
        [11, 12],
        meta_path(tmp_path / "img"),
        {**defaults("ica"), "terms": "neurosynth", "neurosynth_url": ns_server.url + "decode/"},
        client_factory=lambda: client_for(ns_server),
    )
    assert tw.source == "neurosynth" and tw.fallback is None and tw.warnings == []
    assert tw.matrix.toarray().min() == 0 and tw.matrix.toarray()[0].tolist() == [0.2, 0.31, 0.0]
    # default cache: neurosynth.json next to metadata.json
    assert (tmp_path / "img" / "11" / "neurosynth.json").is_file()


@pytest.mark.parametrize("fault", [{"kind": "down"}, {"kind": "down", "mode": "503"}, {"kind": "html200"}])
def test_neurosynth_down_falls_back_to_metadata(ns_server, tmp_path, caplog, fault):
    ids = list(range(11, 31))
    write_metadata(tmp_path / "img", {i: {"name": f"pain {'heat' if i % 2 else 'cold'}"} for i in ids})
    ns_server.add_fault(r"^/api/decode/", fault.pop("kind"), **fault)
    log = logging.getLogger("test.terms.down")
    with caplog.at_level(logging.WARNING, logger="test.terms.down"):
        tw = terms.image_term_weights(
            ids,
            meta_path(tmp_path / "img"),
            {**defaults("ica"), "terms": "neurosynth", "neurosynth_url": ns_server.url + "decode/"},
            client_factory=lambda: client_for(ns_server),
            logger=log,
        )
    assert tw.source == "metadata" and tw.requested == "neurosynth"
    assert tw.fallback.startswith("Neurosynth is down (3 failed requests")
    assert tw.info["down"] is True and tw.info["n_failed"] == terms.MAX_CONSECUTIVE_FAILURES
    assert "Neurosynth is down" in caplog.text
    # polite: stopped after 3 failed requests (each retried at most once by the client)
    assert len({r for r in decode_requests(ns_server)}) == 3
    assert len(decode_requests(ns_server)) <= 6
    assert set(tw.vocabulary) >= {"pain", "heat", "cold", "pain heat"}
    assert not list((tmp_path / "img" / "11").glob("neurosynth.json"))  # failures are not cached


def test_neurosynth_without_client_or_words(tmp_path):
    write_metadata(tmp_path, {1: {"name": "motor"}})
    cfg = {**defaults("ica"), "terms": "neurosynth"}
    tw = terms.image_term_weights([1], meta_path(tmp_path), cfg, client_factory=None)
    assert tw.source == "metadata" and "no client available" in tw.fallback

    def broken():
        raise RuntimeError("no network config")

    tw = terms.image_term_weights([1], meta_path(tmp_path), cfg, client_factory=broken)
    assert (
        tw.source == "metadata"
        and tw.warnings[0] == "neurosynth client could not be created: no network config"
    )
    with pytest.raises(ValueError, match="ica.terms"):
        terms.image_term_weights([1], meta_path(tmp_path), {**defaults("ica"), "terms": "words"})
