"""YAML filter terms -> nilearn's NeuroVault filter objects (nvmeta.select.filters)."""

from __future__ import annotations

import datetime
import re
import subprocess
import sys

import pytest
from nilearn.datasets import neurovault as nv

from nvmeta.errors import ConfigError
from nvmeta.select.filters import (
    OPERATORS,
    build_filters,
    build_terms,
    parse_term,
    validate_terms,
)

KEY = "analyses.pain"


def image_filter_for(term, field="f", default_terms=False):
    cfg = {"image_terms": {field: term}, "default_terms": default_terms}
    return build_filters(cfg, KEY)[0]


# (yaml term, the nilearn object it must behave like, values that match, values that don't)
OPERATOR_CASES = [
    ("T map", "T map", ["T map"], ["Z map", None, "t map"]),
    ({"eq": 5}, 5, [5, 5.0], [6, "5", None]),
    ({"eq": ["a", "b"]}, ["a", "b"], [["a", "b"]], [["b", "a"], "a"]),
    ({"ne": "atlas"}, nv.NotEqual("atlas"), ["statistic_map", None], ["atlas"]),
    ({"in": ["T map", "Z map"]}, nv.IsIn("T map", "Z map"), ["T map", "Z map"], ["F map", None]),
    ({"in": "T map"}, nv.IsIn("T map"), ["T map"], ["Z map"]),
    (
        {"not_in": ["ROI/mask", "parcellation"]},
        nv.NotIn("ROI/mask", "parcellation"),
        ["T map", None],
        ["ROI/mask", "parcellation"],
    ),
    (
        {"contains": ["face", "house"]},
        nv.Contains("face", "house"),
        ["face vs house", ["house", "face", "x"]],
        ["face vs scrambled", None, 3],
    ),
    ({"contains": "pain"}, nv.Contains("pain"), ["pain > rest", ["pain"]], ["rest", None]),
    (
        {"not_contains": ["bad", "test"]},
        nv.NotContains("bad", "test"),
        ["good image", ["ok"]],
        ["test image", "bad", None, 7],
    ),
    # nilearn casts the field to the bound's type: int(20.5) == 20 is not > 20 (use a float bound)
    ({"gt": 20}, nv.GreaterThan(20), [21, 25, "25"], [20, 20.5, 19, None, "abc"]),
    ({"gt": 20.0}, nv.GreaterThan(20.0), [20.5, 21, "20.1"], [20, None]),
    ({"ge": 20}, nv.GreaterOrEqual(20), [20, 21, "20"], [19, None]),
    ({"lt": 20.5}, nv.LessThan(20.5), [20, 20.4, "3"], [20.5, 21, None]),
    ({"le": 20}, nv.LessOrEqual(20), [20, 3], [21, None, "x"]),
    (
        {"gt": "2020-01-01"},
        nv.GreaterThan("2020-01-01"),
        ["2020-07-20T22:14:30.314520Z"],
        ["2016-08-31T17:56:47.241313Z"],
    ),
    (
        {"gt": datetime.date(2020, 1, 1)},  # unquoted YAML date
        nv.GreaterThan("2020-01-01"),
        ["2020-07-20T22:14:30.314520Z"],
        ["2016-08-31T17:56:47.241313Z"],
    ),
    ({"null": True}, nv.IsNull(), [None, "", 0, []], ["x", 5, True]),
    ({"null": False}, nv.NotNull(), ["x", 5], [None, "", 0]),
    ({"not_null": True}, nv.NotNull(), ["x", 25], [None, "", 0]),
    ({"not_null": False}, nv.IsNull(), [None, ""], ["x"]),
    ({"pattern": "fMRI"}, nv.Pattern("fMRI"), ["fMRI-BOLD", "fMRI"], ["PET FDG", "BOLD fMRI", None, 5]),
    (
        {"pattern": "(?i)fmri(-.*)?$"},
        nv.Pattern("fmri(-.*)?$", re.IGNORECASE),
        ["fMRI-BOLD", "FMRI"],
        ["fMRIx", "PET"],
    ),
]


@pytest.mark.parametrize(("term", "reference", "matching", "non_matching"), OPERATOR_CASES)
def test_operator_matches_like_nilearn(term, reference, matching, non_matching):
    filt = image_filter_for(term)
    reference_filter = nv.ResultFilter({"f": reference})
    for value in matching:
        assert filt({"f": value}) is True, (term, value)
        assert reference_filter({"f": value}) is True, (term, value)
    for value in non_matching:
        assert filt({"f": value}) is False, (term, value)
        assert reference_filter({"f": value}) is False, (term, value)


def test_every_operator_is_covered_by_the_cases():
    covered = {next(iter(t)) for t, *_ in OPERATOR_CASES if isinstance(t, dict)}
    assert covered == set(OPERATORS)


def test_missing_field_is_read_as_null():
    assert image_filter_for({"null": True})({}) is True
    assert image_filter_for({"not_null": True})({}) is False
    assert image_filter_for({"ne": "atlas"})({}) is True
    assert image_filter_for("T map")({}) is False


def test_build_terms_returns_nilearn_objects():
    cfg = {
        "default_terms": False,
        "image_terms": {
            "a": {"ne": 1},
            "b": {"in": [1, 2]},
            "c": {"not_in": [3]},
            "d": {"contains": "x"},
            "e": {"not_contains": ["y"]},
            "g": {"gt": 1},
            "h": {"ge": 1},
            "i": {"lt": 1},
            "j": {"le": 1},
            "k": {"null": True},
            "l": {"not_null": True},
            "m": {"pattern": "x.*"},
            "n": 3,
        },
    }
    image_terms, collection_terms = build_terms(cfg, KEY)
    assert collection_terms == {}
    expected = {
        "a": nv.NotEqual,
        "b": nv.IsIn,
        "c": nv.NotIn,
        "d": nv.Contains,
        "e": nv.NotContains,
        "g": nv.GreaterThan,
        "h": nv.GreaterOrEqual,
        "i": nv.LessThan,
        "j": nv.LessOrEqual,
        "k": nv.IsNull,
        "l": nv.NotNull,
        "m": nv.Pattern,
    }
    for field, cls in expected.items():
        assert type(image_terms[field]) is cls, field
    assert image_terms["n"] == 3
    assert image_terms["b"].accepted_ == (1, 2)
    assert image_terms["m"].pattern_ == "x.*"


def test_image_and_collection_filters_are_nilearn_result_filters():
    image_filter, collection_filter = build_filters({}, KEY)
    assert isinstance(image_filter, nv.ResultFilter)
    assert isinstance(collection_filter, nv.ResultFilter)


# ----------------------------------------------------------------------------- default terms

GOOD_IMAGE = {
    "id": 1,
    "not_mni": False,
    "is_thresholded": False,
    "map_type": "T map",
    "image_type": "statistic_map",
}


@pytest.mark.parametrize(
    ("change", "passes"),
    [
        ({}, True),
        ({"not_mni": None}, False),  # nilearn compares with False by equality: null is rejected
        ({"not_mni": True}, False),
        ({"is_thresholded": None}, False),
        ({"is_thresholded": True}, False),
        ({"image_type": "atlas"}, False),
        ({"map_type": "ROI/mask"}, False),
        ({"map_type": "anatomical"}, False),
        ({"map_type": "parcellation"}, False),
        ({"map_type": "Z map"}, True),
        ({"map_type": None}, True),
        ({"image_type": "NIDM results statistic map"}, True),
    ],
)
def test_default_image_terms(change, passes):
    record = {**GOOD_IMAGE, **change}
    image_filter, _ = build_filters({"default_terms": True}, KEY)
    assert image_filter(record) is passes
    # same answer as nilearn's own default terms
    assert nv.ResultFilter(nv.basic_image_terms())(record) is passes
    # default_terms defaults to true
    assert build_filters({}, KEY)[0](record) is passes


def test_missing_not_mni_is_rejected_by_default_terms():
    record = {k: v for k, v in GOOD_IMAGE.items() if k != "not_mni"}
    assert build_filters({}, KEY)[0](record) is False


@pytest.mark.parametrize(
    ("collection", "passes"),
    [
        ({"id": 1, "number_of_images": 5}, True),
        ({"id": 1, "number_of_images": None}, False),
        ({"id": 1, "number_of_images": 0}, False),
        ({"id": 1}, False),
    ],
)
def test_default_collection_terms(collection, passes):
    _, collection_filter = build_filters({}, KEY)
    assert collection_filter(collection) is passes
    assert nv.ResultFilter(nv.basic_collection_terms())(collection) is passes
    _, no_defaults = build_filters({"default_terms": False}, KEY)
    assert no_defaults(collection) is True


def test_default_terms_false_disables_them():
    image_filter, _ = build_filters({"default_terms": False}, KEY)
    assert image_filter({"image_type": "atlas", "not_mni": None}) is True
    assert image_filter({}) is True


def test_user_term_overrides_default_and_keeps_the_others():
    cfg = {"image_terms": {"not_mni": {"ne": True}, "modality": "fMRI-BOLD"}}
    image_filter, _ = build_filters(cfg, KEY)
    base = {**GOOD_IMAGE, "modality": "fMRI-BOLD"}
    assert image_filter({**base, "not_mni": None}) is True  # default would reject null
    assert image_filter({**base, "not_mni": True}) is False
    assert image_filter({**base, "image_type": "atlas"}) is False  # other defaults still on
    assert image_filter({**base, "modality": "PET FDG"}) is False
    image_terms, _ = build_terms(cfg, KEY)
    assert set(image_terms) == {"not_mni", "is_thresholded", "map_type", "image_type", "modality"}


def test_user_map_type_replaces_default_map_type():
    cfg = {"image_terms": {"map_type": {"in": ["ROI/mask"]}}}
    image_filter, _ = build_filters(cfg, KEY)
    assert image_filter({**GOOD_IMAGE, "map_type": "ROI/mask"}) is True
    assert image_filter({**GOOD_IMAGE, "map_type": "T map"}) is False


def test_user_collection_term_overrides_default():
    cfg = {"collection_terms": {"number_of_images": {"ge": 0}, "DOI": {"not_null": True}}}
    _, collection_filter = build_filters(cfg, KEY)
    assert collection_filter({"id": 1, "number_of_images": 0, "DOI": "10.1/x"}) is True
    assert collection_filter({"id": 1, "number_of_images": 3, "DOI": ""}) is False


def test_collection_id_image_term_also_filters_collections():
    cfg = {"image_terms": {"collection_id": {"in": [1425, 8477]}}}
    image_filter, collection_filter = build_filters(cfg, KEY)
    assert collection_filter({"id": 1425, "number_of_images": 21}) is True
    assert collection_filter({"id": 1, "number_of_images": 21}) is False
    assert image_filter({**GOOD_IMAGE, "collection_id": 8477}) is True
    assert image_filter({**GOOD_IMAGE, "collection_id": 2}) is False


# ----------------------------------------------------------------------------- config errors


def _error(cfg):
    with pytest.raises(ConfigError) as info:
        validate_terms(cfg, KEY)
    # build_filters raises the same error
    with pytest.raises(ConfigError) as info2:
        build_filters(cfg, KEY)
    assert str(info.value) == str(info2.value)
    return str(info.value)


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


def test_unknown_operator_names_key_and_lists_operators():
    msg = _error({"image_terms": {"map_type": {"like": "T"}}})
    assert msg.startswith("analyses.pain.image_terms.map_type: unknown filter operator 'like'")
    for op in OPERATORS:
        assert op in msg
    assert "one-key mapping" in msg


def test_bad_regex_names_key():
    msg = _error({"image_terms": {"name": {"pattern": "(unclosed"}}})
    assert msg.startswith("analyses.pain.image_terms.name.pattern: invalid regular expression '(unclosed'")
    assert "re.match" in msg


@pytest.mark.parametrize("mapping", [{"in": ["T map"], "ne": "x"}, {}])
def test_mapping_with_other_than_one_key(mapping):
    msg = _error({"collection_terms": {"DOI": mapping}})
    assert msg.startswith("analyses.pain.collection_terms.DOI: a filter mapping must have exactly one key")
    assert "eq, ne, in, not_in" in msg


@pytest.mark.parametrize(
    ("term", "fragment"),
    [
        (["T map", "Z map"], "a plain list is ambiguous"),
        ({"null": "yes"}, "`null` takes true or false"),
        ({"not_null": None}, "`not_null` takes true or false"),
        ({"gt": [1, 2]}, "`gt` takes a number or a string"),
        ({"le": True}, "`le` takes a number or a string"),
        ({"pattern": 5}, "`pattern` takes a regular expression string"),
        ({"in": {"a": 1}}, "`in` takes a list of values"),
        ({"contains": [{"a": 1}]}, "`contains` takes a list of plain values"),
        ({"ne": {"a": 1}}, "`ne` takes a plain value or a list"),
        ({"a": 1}, "unknown filter operator 'a'"),
    ],
)
def test_bad_terms(term, fragment):
    msg = _error({"image_terms": {"map_type": term}})
    assert msg.startswith("analyses.pain.image_terms.map_type")
    assert fragment in msg


def test_terms_block_must_be_a_mapping():
    msg = _error({"image_terms": ["map_type"]})
    assert msg.startswith("analyses.pain.image_terms: must be a mapping")


def test_default_terms_must_be_bool():
    msg = _error({"default_terms": "yes"})
    assert msg.startswith("analyses.pain.default_terms: must be true")


def test_valid_config_passes_validation():
    validate_terms(
        {
            "image_terms": {"map_type": {"in": ["T map"]}, "number_of_subjects": {"ge": 10}},
            "collection_terms": {"DOI": {"not_null": True}},
            "default_terms": True,
        },
        KEY,
    )
    validate_terms({"image_terms": None, "collection_terms": None}, KEY)


def test_parse_term_neutral_form():
    assert parse_term("T map", "p") == ("eq", ("T map",))
    assert parse_term({"in": ["a", "b"]}, "p") == ("in", ("a", "b"))
    assert parse_term({"contains": "x"}, "p") == ("contains", ("x",))
    assert parse_term({"ge": datetime.date(2020, 1, 2)}, "p") == ("ge", ("2020-01-02",))


def test_validate_terms_does_not_import_nilearn():
    code = (
        "import sys\n"
        "from nvmeta.select.filters import validate_terms\n"
        "validate_terms({'image_terms': {'map_type': {'in': ['T map']}, 'name': {'pattern': 'a'}}}, 'k')\n"
        "assert 'nilearn' not in sys.modules, 'nilearn imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
