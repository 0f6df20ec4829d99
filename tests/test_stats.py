"""Tests of nvmeta.images.stats: t → z against a 50-digit mpmath reference, and resolve_df."""

from __future__ import annotations

import math

import mpmath as mp
import numpy as np
import pytest
from scipy import special, stats

from nvmeta.images.stats import MISSING_SAMPLE_SIZE, resolve_df, resolve_sample_size, t_to_z
from nvmeta.workflow.config import defaults

DFS = [1, 2, 3, 5, 10, 30, 100, 1000, 10000, 100000]
REL_TOL = 1e-6

# ---------------------------------------------------------------------------------------
# Independent high-precision reference (mpmath, 50 significant digits)
# ---------------------------------------------------------------------------------------


def _upper_tail(t: mp.mpf, df: mp.mpf) -> mp.mpf:
    """P(T > t) for t >= 0, = I_x(df/2, 1/2) / 2 with x = df / (df + t^2)."""
    x = df / (df + t * t)
    a, b = df / 2, mp.mpf(1) / 2
    if x < mp.mpf("0.99"):
        # I_x(a, b) = x^a (1-x)^b / (a B(a, b)) * 2F1(a + b, 1; a + 1; x): a series of positive
        # terms with ratio < x. (mpmath's betainc fails to converge for some large-df tail points.)
        total = term = mp.mpf(1)
        n = 0
        eps = mp.mpf(10) ** (-mp.mp.dps)
        while term > total * eps:
            term *= x * (a + b + n) / (a + 1 + n)
            total += term
            n += 1
        log_pref = a * mp.log(x) + b * mp.log1p(-x) - mp.log(a) - mp.log(mp.beta(a, b))
        return mp.exp(log_pref) * total / 2
    return mp.betainc(a, b, 0, x, regularized=True) / 2


def reference_z(t: float, df: float) -> mp.mpf:
    """z with Φ(z) = F_df(t), to ~50 digits (p far below the double range is fine)."""
    with mp.workdps(50):
        t = mp.mpf(t)
        df = mp.mpf(df)
        if t == 0:
            return mp.mpf(0)
        sign = 1 if t > 0 else -1
        t = abs(t)
        p = _upper_tail(t, df)
        if p > mp.mpf("0.25"):
            # centre: z = sqrt(2) erfinv(P(-t < T < t)), no cancellation near t = 0
            central = mp.betainc(mp.mpf(1) / 2, df / 2, 0, t * t / (df + t * t), regularized=True)
            return sign * mp.sqrt(2) * mp.erfinv(central)
        log_p = mp.log(p)
        start = mp.sqrt(-2 * log_p) if log_p < -700 else mp.mpf(-special.ndtri(float(p)))
        z = mp.findroot(lambda z: mp.log(mp.ncdf(-z)) - log_p, start)
        return sign * z


def _rel_err(value: float, ref: mp.mpf) -> float:
    if ref == 0:
        return abs(value)
    return float(abs((mp.mpf(value) - ref) / ref))


# ---------------------------------------------------------------------------------------
# t → z accuracy
# ---------------------------------------------------------------------------------------

T_GRID = np.concatenate([[0.0], np.geomspace(1e-3, 1000.0, 36)])


@pytest.mark.parametrize("df", DFS)
def test_t_to_z_matches_mpmath_grid(df):
    z = t_to_z(T_GRID, df)
    z_neg = t_to_z(-T_GRID, df)
    errors = []
    for t, zi in zip(T_GRID, z, strict=True):
        ref = reference_z(float(t), df)
        # |z| < 1e-3 only arises at t = 0 here (exact 0); keep an absolute floor anyway.
        err = _rel_err(float(zi), ref) if abs(ref) > 1e-300 else abs(float(zi))
        errors.append((err, t, float(zi), float(ref)))
    worst = max(errors)
    assert worst[0] <= REL_TOL, worst
    # measured: <= 2e-15 with scipy 1.17; 1e-10 leaves room for other scipy/Boost builds
    assert worst[0] <= 1e-10, worst
    assert np.array_equal(z_neg, -z)


@pytest.mark.parametrize("df", [1, 2, 3, 2.5, 27.5])
def test_t_to_z_small_and_fractional_df_negative_t(df):
    ts = np.array([-1000.0, -100.0, -30.0, -7.0, -2.0, -0.5, -1e-5])
    z = t_to_z(ts, df)
    for t, zi in zip(ts, z, strict=True):
        assert _rel_err(float(zi), reference_z(float(t), df)) <= 1e-10


@pytest.mark.parametrize(
    ("t", "df", "expected"),
    [
        (-10.0, 200, -8.9943),  # naive norm.isf(t.sf(t, df)) gives -inf here
        (60.0, 1000, 39.06),  # NiMARE gives 35.79
        (200.0, 1000, 60.93),
        (1000.0, 100000, 489.68),
        (1000.0, 1, 3.4155),
    ],
)
def test_anchor_points(t, df, expected):
    z = t_to_z(t, df)
    assert isinstance(z, float)
    assert math.isfinite(z)
    assert round(z, len(str(expected).split(".")[1])) == expected
    assert _rel_err(z, reference_z(t, df)) <= 1e-10


def test_naive_formula_fails_where_t_to_z_does_not():
    with np.errstate(all="ignore"):
        naive = stats.norm.isf(stats.t.sf(-10.0, 200))
    assert naive == -np.inf
    assert math.isfinite(t_to_z(-10.0, 200))


def _tail_boundary(df: float, p: float) -> float:
    """t with stdtr(df, -t) ≈ p, by bisection in log t (stdtrit underflows for tiny p)."""
    lo, hi = 0.0, 700.0  # log t
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if special.stdtr(df, -math.exp(mid)) > p:
            lo = mid
        else:
            hi = mid
    return math.exp(0.5 * (lo + hi))


@pytest.mark.parametrize("df", [1, 3, 30, 1000, 100000])
def test_regime_boundaries_accurate_and_monotonic(df):
    # the implementation switches method at p = 0.4 and p = 1e-290: check both sides
    for p in (0.4, 1e-290):
        tb = _tail_boundary(df, p)
        ts = tb * (1.0 + np.linspace(-1e-6, 1e-6, 401))
        z = t_to_z(ts, df)
        assert np.all(np.diff(z) > 0)
        for t in (ts[0], ts[-1]):
            if t <= 1000:
                assert _rel_err(float(t_to_z(t, df)), reference_z(float(t), df)) <= 1e-10


# ---------------------------------------------------------------------------------------
# t → z properties
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("df", [*DFS, 2.5, 1e7, np.inf])
def test_monotonic_on_fine_grid(df):
    pos = np.geomspace(1e-6, 1000.0, 30001)
    t = np.concatenate([-pos[::-1], [0.0], pos])
    z = t_to_z(t, df)
    assert np.all(np.isfinite(z))
    assert np.all(np.diff(z) > 0)
    lin = np.linspace(-50.0, 50.0, 100001)
    assert np.all(np.diff(t_to_z(lin, df)) > 0)


@pytest.mark.parametrize("df", [*DFS, 0.5, 2.5, 1e12])
def test_finite_and_exactly_odd_everywhere(df):
    rng = np.random.default_rng(0)
    t = np.concatenate(
        [
            10.0 ** rng.uniform(-310, 308, 20000),
            [5e-324, 1e-300, 1e-10, 1.0, 1e20, 1e154, 1e155, 1e200, np.finfo(np.float64).max],
        ]
    )
    z = t_to_z(t, df)
    assert np.all(np.isfinite(z))
    assert np.all(z >= 0)
    assert np.array_equal(t_to_z(-t, df), -z)
    # sign preserved, zero maps to zero (signed)
    assert t_to_z(0.0, df) == 0.0
    assert math.copysign(1.0, t_to_z(-0.0, df)) == -1.0


def test_tiny_t_uses_slope_at_zero():
    for df in (1, 3, 100000):
        slope = math.sqrt(2 / df) * math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2))
        for t in (1e-300, 1e-12, 1e-9):
            assert t_to_z(t, df) == pytest.approx(t * slope, rel=1e-14)
        assert t_to_z(1e-8, df) == pytest.approx(float(reference_z(1e-8, df)), rel=1e-14)


def test_nan_inf_passthrough():
    z = t_to_z(np.array([np.nan, np.inf, -np.inf, 2.0]), 10)
    assert np.isnan(z[0])
    assert z[1] == np.inf and z[2] == -np.inf
    assert z[3] == pytest.approx(float(reference_z(2.0, 10)), rel=1e-14)
    z = t_to_z(np.array([1.0, 2.0]), np.array([np.nan, 10.0]))
    assert np.isnan(z[0]) and np.isfinite(z[1])
    assert math.isnan(t_to_z(float("nan"), 5))


def test_infinite_df_is_normal():
    t = np.array([-40.0, -3.0, -1e-3, 0.0, 1e-12, 0.7, 5.0, 60.0])
    assert np.array_equal(t_to_z(t, np.inf), t)


def test_broadcasting_dtype_and_scalars():
    t = np.array([[-3.0], [0.5], [12.0]], dtype=np.float32)
    df = np.array([1.0, 10.0, 1000.0, 1e5])
    z = t_to_z(t, df)
    assert z.shape == (3, 4)
    assert z.dtype == np.float64
    for i in range(3):
        for j in range(4):
            assert z[i, j] == t_to_z(float(t[i, 0]), float(df[j]))
    assert isinstance(t_to_z(2.0, 10), float)
    assert isinstance(t_to_z(np.float32(2.0), np.int64(10)), float)
    assert isinstance(t_to_z([2.0], 10), np.ndarray)
    img = np.full((4, 5, 6), 3.0, dtype=np.float32)
    out = t_to_z(img, 25)
    assert out.shape == img.shape
    assert np.all(out == t_to_z(3.0, 25))


def test_invalid_df_raises():
    with pytest.raises(ValueError, match="degrees of freedom"):
        t_to_z(1.0, 0)
    with pytest.raises(ValueError, match="degrees of freedom"):
        t_to_z([1.0, 2.0], [5.0, -1.0])


def test_input_not_modified():
    t = np.array([-5.0, 0.0, 70.0])
    before = t.copy()
    t_to_z(t, 100)
    assert np.array_equal(t, before)


# ---------------------------------------------------------------------------------------
# resolve_df
# ---------------------------------------------------------------------------------------


def rec(**kw):
    base = {"id": 101, "collection_id": 7, "statistic_parameters": None, "number_of_subjects": None}
    base.update(kw)
    return base


def test_statistic_parameters_preferred():
    assert resolve_df(rec(statistic_parameters=23.0, number_of_subjects=25), defaults("conversion")) == (
        23.0,
        "statistic_parameters",
        None,
    )
    # without a known n, any finite value >= 1 is plausible
    assert resolve_df(rec(statistic_parameters=1.0), defaults("conversion")) == (
        1.0,
        "statistic_parameters",
        None,
    )
    # numeric strings (e.g. from selection.tsv) are accepted
    assert resolve_df(rec(statistic_parameters="27.5"), defaults("conversion")) == (
        27.5,
        "statistic_parameters",
        None,
    )
    # preferred over overrides too
    conv = {"df_images": {"101": 5}, "df_collections": {"7": 6}}
    assert resolve_df(rec(statistic_parameters=40), {**defaults("conversion"), **conv}) == (
        40.0,
        "statistic_parameters",
        None,
    )
    # df == n is still plausible
    assert (
        resolve_df(rec(statistic_parameters=25, number_of_subjects=25), defaults("conversion"))[1]
        == "statistic_parameters"
    )


@pytest.mark.parametrize("bad", [0.0, 0.5, -3.0, float("nan"), float("inf"), "abc", True, [3], 26.0])
def test_implausible_statistic_parameters_ignored(bad):
    # 26 > n = 25 is implausible: fall through to the n rule
    assert resolve_df(rec(statistic_parameters=bad, number_of_subjects=25), defaults("conversion")) == (
        23.0,
        "n-2",
        None,
    )


def test_statistic_parameters_checked_against_config_n():
    conv = {"n_images": {"101": 20}}
    assert resolve_df(rec(statistic_parameters=30), {**defaults("conversion"), **conv}) == (18.0, "n-2", None)
    assert resolve_df(rec(statistic_parameters=19), {**defaults("conversion"), **conv}) == (
        19.0,
        "statistic_parameters",
        None,
    )


def test_n_rule_default_and_n_minus_1():
    assert resolve_df(rec(number_of_subjects=25), defaults("conversion")) == (23.0, "n-2", None)
    assert resolve_df(rec(number_of_subjects=25), {**defaults("conversion"), "df": "n-2"}) == (
        23.0,
        "n-2",
        None,
    )
    assert resolve_df(rec(number_of_subjects=25), {**defaults("conversion"), "df": "n-1"}) == (
        24.0,
        "n-1",
        None,
    )
    assert resolve_df(rec(number_of_subjects="12"), {**defaults("conversion"), "df": "n-1"}) == (
        11.0,
        "n-1",
        None,
    )
    assert resolve_df(rec(number_of_subjects=3), defaults("conversion")) == (1.0, "n-2", None)
    assert resolve_df(rec(number_of_subjects=2), {**defaults("conversion"), "df": "n-1"}) == (
        1.0,
        "n-1",
        None,
    )
    # config may be None / empty
    assert resolve_df(rec(number_of_subjects=10), defaults("conversion")) == (8.0, "n-2", None)


def test_zero_n_is_missing():
    # NIDM maps are stored with n = 0: unknown, not a value to complain about
    assert resolve_df(rec(number_of_subjects=0), {**defaults("conversion"), "df": "n-2"}) == (
        None,
        None,
        MISSING_SAMPLE_SIZE,
    )


@pytest.mark.parametrize(("n", "rule", "df"), [(2, "n-2", 0), (1, "n-2", -1), (1, "n-1", 0)])
def test_n_at_or_below_offset_says_so(n, rule, df):
    """n = 1 used to be reported as "missing sample size": the record has an n, too small for a df."""
    got = resolve_df(rec(number_of_subjects=n), {**defaults("conversion"), "df": rule})
    assert got[:2] == (None, None)
    assert got[2] == (
        f"implausible sample size: number_of_subjects = {n} leaves no degrees of freedom for a t map "
        f"(df = n - {n - df} = {df} by the {rule!r} rule; set conversion.df_images to override)"
    )


@pytest.mark.parametrize(
    ("value", "why"),
    [
        ("twenty", "'twenty' is not a number"),
        ("nan", "'nan' is not a number"),
        ("NaN", "'NaN' is not a number"),
        ("0x14", "'0x14' is not a number"),
        ("1_000", "'1_000' is not a number"),
        ("inf", "'inf' is not a number"),
        ("", None),
        ("  ", None),
        (True, "True is not a number"),
        ([20], "[20] is not a number"),
        ({"n": 20}, "{'n': 20} is not a number"),
        ("x" * 100, "'" + "x" * 36 + "... is not a number"),
        ("1e400", "= '1e400' is not finite"),
        (float("inf"), "= inf is not finite"),
        (float("-inf"), "= -inf is not finite"),
        (10**400, "= " + "1" + "0" * 36 + "... is too large"),
        (-4, "= -4 is negative"),
        ("-4", "= -4 is negative"),
        (20.5, "= 20.5 is not an integer"),
    ],
    ids=lambda v: repr(v)[:16],
)
def test_given_but_unusable_n_is_never_silently_missing(value, why):
    """'twenty', 'nan', '0x14', inf or 1e400 in number_of_subjects used to become "missing sample size"
    (or a processing error), as if the record had no n."""
    s = resolve_sample_size(
        rec(number_of_subjects=value, statistic_parameters=18), defaults("conversion"), max_n=100_000
    )
    if why is None:  # empty text is absent: statistic_parameters give the df
        assert (s.n, s.df, s.reason) == (None, 18.0, None)
        return
    assert (s.n, s.df) == (None, None)
    assert (
        s.reason == f"implausible sample size: number_of_subjects {why} (set conversion.n_images to override)"
    )
    # an override replaces it, as for any unusable record value
    s2 = resolve_sample_size(
        rec(number_of_subjects=value), {**defaults("conversion"), "n_images": {101: 30}}, max_n=100_000
    )
    assert (s2.n, s2.n_source, s2.df, s2.reason) == (30, "n_images", 28.0, None)


def test_numeric_types_from_tables_are_numbers():
    assert resolve_sample_size(rec(number_of_subjects=np.int64(25)), defaults("conversion")).n == 25
    assert resolve_sample_size(rec(number_of_subjects=np.float32(25.0)), defaults("conversion")).n == 25
    assert resolve_sample_size(rec(number_of_subjects=" 25 "), defaults("conversion")).n == 25
    assert resolve_sample_size(rec(number_of_subjects="2.5e1"), defaults("conversion")).n == 25
    assert (
        resolve_sample_size(rec(number_of_subjects=np.nan), defaults("conversion")).reason
        == MISSING_SAMPLE_SIZE
    )


TWO_SAMPLE = {"design": "two_sample", "n1": 12, "n2": 8}


def test_two_sample_design_n_is_the_one_n():
    # no n in the record: n1 + n2 is the n, and the df is n1 + n2 - 2 whatever conversion.df says
    for conv in (
        {"design_images": {"101": TWO_SAMPLE}, "df": "n-1"},
        {"design_collections": {7: TWO_SAMPLE}},
    ):
        table = next(iter(k for k in conv if k.startswith("design")))
        s = resolve_sample_size(rec(), {**defaults("conversion"), **conv})
        assert (s.n, s.n_source, s.df, s.df_source, s.reason) == (20, table, 18.0, "two_sample", None)
    # the record's n agrees: kept with its source
    s = resolve_sample_size(
        rec(number_of_subjects=20), {**defaults("conversion"), "design_images": {101: TWO_SAMPLE}}
    )
    assert (s.n, s.n_source, s.df, s.df_source) == (20, "number_of_subjects", 18.0, "two_sample")
    # an image entry wins over its collection's
    conv = {"design_images": {101: TWO_SAMPLE}, "design_collections": {7: {**TWO_SAMPLE, "n1": 40}}}
    assert resolve_sample_size(rec(number_of_subjects=20), {**defaults("conversion"), **conv}).n == 20


@pytest.mark.parametrize(
    ("fields", "conv", "source"),
    [
        ({"number_of_subjects": 25}, {"design_images": {"101": TWO_SAMPLE}}, "number_of_subjects = 25"),
        ({}, {"n_images": {101: 30}, "design_collections": {"7": TWO_SAMPLE}}, "n_images = 30"),
    ],
)
def test_two_sample_design_conflicting_with_n_excludes(fields, conv, source):
    """n1 + n2 = 20 against n = 25 gave g from 12/8 and sqrt(n) weights from 25, without a word."""
    s = resolve_sample_size(rec(**fields), {**defaults("conversion"), **conv})
    table = "design_images[101]" if "design_images" in conv else "design_collections[7]"
    assert (s.n, s.df) == (None, None)
    assert s.reason == (
        f"sample size conflict: {source} but conversion.{table} declares n1 + n2 = 12 + 8 = 20 "
        "(an image has one n: fix n1 and n2)"
    )
    # a Z map too: its weights read n
    assert (
        resolve_sample_size(rec(**fields), {**defaults("conversion"), **conv}, need_df=False).reason
        == s.reason
    )


def test_nidm_zero_n_uses_config_n():
    # NIDM maps carry n = 0: treated as unknown, so n_images / n_collections apply
    assert resolve_df(rec(number_of_subjects=0), {**defaults("conversion"), "n_images": {"101": 30}}) == (
        28.0,
        "n-2",
        None,
    )
    assert resolve_df(
        rec(number_of_subjects=0), {**defaults("conversion"), "n_collections": {7: 16}, "df": "n-1"}
    ) == (
        15.0,
        "n-1",
        None,
    )


@pytest.mark.parametrize("key", ["101", 101])
def test_n_images_any_key_type(key):
    assert resolve_df(rec(), {**defaults("conversion"), "n_images": {key: 12}}) == (10.0, "n-2", None)


@pytest.mark.parametrize("key", ["7", 7])
def test_n_collections_any_key_type(key):
    assert resolve_df(rec(), {**defaults("conversion"), "n_collections": {key: 12}}) == (10.0, "n-2", None)


def test_n_images_before_n_collections_and_record_n_first():
    conv = {"n_images": {"101": 12}, "n_collections": {"7": 40}}
    assert resolve_df(rec(), {**defaults("conversion"), **conv}) == (10.0, "n-2", None)
    assert resolve_df(rec(number_of_subjects=22), {**defaults("conversion"), **conv}) == (20.0, "n-2", None)
    assert resolve_df(rec(id=5), {**defaults("conversion"), **conv}) == (38.0, "n-2", None)


@pytest.mark.parametrize("key", ["101", 101])
def test_df_image_override(key):
    conv = {"df_images": {key: 17.5}, "df_collections": {"7": 9}}
    assert resolve_df(rec(), {**defaults("conversion"), **conv}) == (17.5, "override_image", None)


@pytest.mark.parametrize("key", ["7", 7])
def test_df_collection_override(key):
    assert resolve_df(rec(), {**defaults("conversion"), "df_collections": {key: 9}}) == (
        9.0,
        "override_collection",
        None,
    )
    # image override for another image does not apply
    assert resolve_df(
        rec(), {**defaults("conversion"), "df_images": {"102": 3}, "df_collections": {key: 9}}
    ) == (
        9.0,
        "override_collection",
        None,
    )


def test_override_applies_after_n_rule_as_specified():
    conv = {"df_images": {"101": 50}}
    # documented order: a usable n wins over a df override ...
    assert resolve_df(rec(number_of_subjects=25), {**defaults("conversion"), **conv}) == (23.0, "n-2", None)
    # ... the override rescues n <= offset and NIDM n = 0
    assert resolve_df(rec(number_of_subjects=2), {**defaults("conversion"), **conv}) == (
        50.0,
        "override_image",
        None,
    )
    assert resolve_df(rec(number_of_subjects=0), {**defaults("conversion"), **conv}) == (
        50.0,
        "override_image",
        None,
    )


@pytest.mark.parametrize("bad", [0, -1, "x", None, float("nan")])
def test_invalid_override_ignored(bad):
    assert resolve_df(rec(), {**defaults("conversion"), "df_images": {"101": bad}}) == (
        None,
        None,
        MISSING_SAMPLE_SIZE,
    )


def test_missing_sample_size():
    assert resolve_df(rec(), defaults("conversion")) == (None, None, MISSING_SAMPLE_SIZE)
    assert resolve_df({}, defaults("conversion")) == (None, None, MISSING_SAMPLE_SIZE)
    assert resolve_df(
        rec(number_of_subjects=None, statistic_parameters=None), {**defaults("conversion"), "df": "n-1"}
    ) == (
        None,
        None,
        MISSING_SAMPLE_SIZE,
    )
    assert MISSING_SAMPLE_SIZE == "missing sample size"


def test_selection_row_style_record():
    # selection.tsv rows: image_id instead of id, NaN for missing values
    row = {
        "image_id": 101,
        "collection_id": 7,
        "statistic_parameters": float("nan"),
        "number_of_subjects": float("nan"),
    }
    assert resolve_df(row, {**defaults("conversion"), "df_images": {"101": 8}}) == (
        8.0,
        "override_image",
        None,
    )
    row["number_of_subjects"] = 30.0
    assert resolve_df(row, defaults("conversion")) == (28.0, "n-2", None)


def test_bad_rule_raises():
    with pytest.raises(ValueError, match="n-2"):
        resolve_df(rec(number_of_subjects=10), {**defaults("conversion"), "df": "n-3"})


def test_non_integral_or_huge_n_is_not_silently_used():
    from nvmeta.images.stats import resolve_sample_size

    # 20.5 used to give df = 18.5 while qc.json said n = 20
    df, src, reason = resolve_df(rec(number_of_subjects=20.5), defaults("conversion"))
    assert (df, src) == (None, None) and reason.startswith(
        "implausible sample size: number_of_subjects = 20.5"
    )
    s = resolve_sample_size(rec(number_of_subjects=1e9), defaults("conversion"), max_n=100_000)
    assert s.n is None and s.df is None and "1e+09 > qc.max_n = 100000" in s.reason
    s = resolve_sample_size(
        rec(number_of_subjects="30.0"), {**defaults("conversion"), "df": "n-1"}, max_n=100_000
    )
    assert (s.n, s.n_source, s.df, s.df_source, s.reason) == (30, "number_of_subjects", 29.0, "n-1", None)
    # a Z map (need_df=False) gets its df too when it can be had (its effect sizes need it)
    s = resolve_sample_size(
        rec(number_of_subjects=0), {**defaults("conversion"), "n_collections": {"7": 12}}, need_df=False
    )
    assert (s.n, s.n_source, s.df, s.reason) == (12, "n_collections", 10.0, None)
    s = resolve_sample_size(rec(number_of_subjects=0), defaults("conversion"), need_df=False)
    assert (s.n, s.df, s.reason) == (None, None, None)
