"""Statistics helpers: exact t → z conversion and per-image degrees of freedom.

This module is imported by every per-image job, so it only imports numpy and
``scipy.special`` at module level (no ``scipy.stats``, pandas, nilearn...).
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import special

__all__ = ["t_to_z", "resolve_df", "resolve_sample_size", "SampleSize", "MISSING_SAMPLE_SIZE"]

#: Exclusion reason when no degrees of freedom can be determined (exact string, see contracts).
MISSING_SAMPLE_SIZE = "missing sample size"

# Below this upper-tail probability the direct double-precision tail (``stdtr``) is
# either subnormal (loses relative precision) or underflows to 0: use the log-space
# continued fraction instead.  1e-290 is comfortably above the subnormal range (~2.2e-308).
_FAR_TAIL_P = 1e-290
# Above this upper-tail probability (|z| < ~0.253) ``-ndtri(p)`` suffers from
# cancellation (p ≈ 0.5): use the central formula z = sqrt(2) erfinv(P(-|t| < T < |t|)).
_CENTRAL_P = 0.4
# Continued fraction settings.
_CF_MAX_ITER = 10_000
_CF_EPS = 1e-16
_TINY = 1e-300
# Below this |t| the linear term of the Taylor series is exact in double precision.
_TINY_T = 1e-9


def _log_ibeta_small(
    a: np.ndarray, b: float, x: np.ndarray, log_x: np.ndarray, log_1mx: np.ndarray
) -> np.ndarray:
    """Log of the regularised incomplete beta function ``log I_x(a, b)`` in its lower tail.

    Uses the classical continued fraction (Numerical Recipes ``betacf``, evaluated with the
    modified Lentz algorithm) with the prefactor ``x**a (1-x)**b / (a B(a, b))`` kept in
    log space, so values far below the double-precision range (e.g. ``1e-800``) are
    represented exactly enough.  Valid (fast convergence) for ``x < (a + 1) / (a + b + 2)``,
    which always holds in the far tail where it is used.

    Parameters
    ----------
    a : ndarray
        First shape parameter (``df / 2``), 1-D.
    b : float
        Second shape parameter (``1/2`` here).
    x : ndarray
        Argument, ``df / (df + t**2)``, same shape as ``a``.
    log_x, log_1mx : ndarray
        ``log(x)`` and ``log(1 - x)``, computed by the caller without cancellation.

    Returns
    -------
    ndarray
        ``log I_x(a, b)``.
    """
    qab = a + b
    qap = a + 1.0
    qam = a - 1.0
    c = np.ones_like(x)
    d = 1.0 - qab * x / qap
    d = np.where(np.abs(d) < _TINY, _TINY, d)
    d = 1.0 / d
    h = d.copy()
    active = np.ones(x.shape, dtype=bool)
    for m in range(1, _CF_MAX_ITER + 1):
        idx = np.flatnonzero(active)
        if idx.size == 0:
            break
        am, xm, qm, qbm, qpm = a[idx], x[idx], qam[idx], qab[idx], qap[idx]
        cm, dm, hm = c[idx], d[idx], h[idx]
        m2 = 2.0 * m
        # even step
        aa = m * (b - m) * xm / ((qm + m2) * (am + m2))
        dm = 1.0 + aa * dm
        dm = np.where(np.abs(dm) < _TINY, _TINY, dm)
        cm = 1.0 + aa / cm
        cm = np.where(np.abs(cm) < _TINY, _TINY, cm)
        dm = 1.0 / dm
        hm = hm * dm * cm
        # odd step
        aa = -(am + m) * (qbm + m) * xm / ((am + m2) * (qpm + m2))
        dm = 1.0 + aa * dm
        dm = np.where(np.abs(dm) < _TINY, _TINY, dm)
        cm = 1.0 + aa / cm
        cm = np.where(np.abs(cm) < _TINY, _TINY, cm)
        dm = 1.0 / dm
        delta = dm * cm
        hm = hm * delta
        c[idx], d[idx], h[idx] = cm, dm, hm
        active[idx] = np.abs(delta - 1.0) >= _CF_EPS
    if b == 0.5:
        # log B(a, 1/2) = log Γ(1/2) - log(Γ(a + 1/2) / Γ(a)); poch is accurate for large a
        # where betaln loses ~1e-11 relative.
        log_beta = 0.5 * math.log(math.pi) - np.log(special.poch(a, 0.5))
    else:
        log_beta = special.betaln(a, b)
    log_prefactor = a * log_x + b * log_1mx - np.log(a) - log_beta
    return log_prefactor + np.log(h)


def _far_tail_z(at: np.ndarray, df: np.ndarray) -> np.ndarray:
    """|z| for |t| in the far upper tail (upper-tail probability below ``_FAR_TAIL_P``).

    ``log p = log(1/2) + log I_x(df/2, 1/2)`` with ``x = df / (df + t**2)``, then
    ``z = -ndtri_exp(log p)`` plus one Newton step.
    """
    z = np.empty_like(at)
    inf_t = np.isinf(at)
    z[inf_t] = np.inf
    # df = inf: the t distribution is the standard normal.
    inf_df = np.isinf(df) & ~inf_t
    z[inf_df] = at[inf_df]
    ok = ~(inf_t | inf_df)
    if np.any(ok):
        t_ok, df_ok = at[ok], df[ok]
        # r = t^2 / df in logs: t^2 overflows for |t| > ~1e154.
        log_r = 2.0 * np.log(t_ok) - np.log(df_ok)
        r = np.exp(log_r)
        big = log_r > 600.0
        log1p_r = np.where(big, log_r + np.log1p(np.exp(-log_r)), np.log1p(r))
        log_x = -log1p_r  # log(df / (df + t^2))
        log_1mx = log_r - log1p_r  # log(t^2 / (df + t^2))
        x = np.exp(log_x)
        log_p = np.log(0.5) + _log_ibeta_small(0.5 * df_ok, 0.5, x, log_x, log_1mx)
        zk = -special.ndtri_exp(log_p)
        # One Newton step on log Φ(-z) = log p (log_ndtr is accurate to ~1 ulp in the far tail,
        # ndtri_exp only to ~1e-12 for very negative arguments).
        log_sf = special.log_ndtr(-zk)
        log_pdf = -0.5 * zk * zk - 0.5 * math.log(2.0 * math.pi)
        zk = zk + (log_sf - log_p) * np.exp(log_sf - log_pdf)
        z[ok] = zk
    return z


def t_to_z(t: Any, df: Any) -> np.ndarray | float:
    """Convert Student t statistics to standard-normal z statistics of equal tail probability.

    ``z = Φ⁻¹(F_df(t))``, computed accurately over the whole range: finite for every
    finite ``t`` (no ``±inf`` from an underflowing p-value), exactly odd
    (``t_to_z(-t, df) == -t_to_z(t, df)``), monotonic in ``t``, and within a few 1e-15
    relative error of a 50-digit mpmath reference for ``1 <= df <= 100000`` and
    ``|t| <= 1000`` (measured with scipy 1.17; the tests require 1e-6, and 1e-10).

    Parameters
    ----------
    t : array_like or float
        t statistics (any real dtype; computed in float64). NaN stays NaN; ``±inf`` maps
        to ``±inf``.
    df : array_like or float
        Degrees of freedom, scalar or broadcastable against ``t``. Must be ``> 0``
        (``df = inf`` gives ``z = t``); NaN gives NaN.

    Returns
    -------
    ndarray or float
        z statistics as a float64 array of the broadcast shape, or a Python float when
        both inputs are scalars.

    Raises
    ------
    ValueError
        If any degrees of freedom are ``<= 0``.

    Notes
    -----
    The computation is done on ``|t|`` and the sign copied at the end, which makes the
    result exactly odd. Let ``p = P(T > |t|)`` be the upper-tail probability. Three
    regimes are used, each only for the elements that need it:

    1. *Bulk* (``1e-290 <= p <= 0.4``): ``p = stdtr(df, -|t|)`` (Boost's incomplete beta,
       accurate to a few ulps in relative terms in the lower tail) and ``z = -ndtri(p)``.
       The naive recipe ``norm.isf(t.sf(t, df))`` is accurate here too (for positive t).
    2. *Centre* (``p > 0.4``, i.e. ``|z| < 0.25``): ``-ndtri(p)`` loses relative accuracy
       as ``p → 1/2`` (cancellation), so use the central probability
       ``c = P(-|t| < T < |t|) = I_{t²/(df+t²)}(1/2, df/2)`` and ``z = √2 erfinv(c)``.
    3. *Far tail* (``p < 1e-290``, where ``p`` is subnormal or underflows to 0, e.g.
       ``t = 60, df = 1000`` → ``z = 39.06``): work in log space,
       ``log p = log(1/2) + log I_x(df/2, 1/2)`` with ``x = df/(df+t²)``, where the
       incomplete beta is evaluated with its continued fraction and its prefactor
       ``x^a (1-x)^b / (a B(a, b))`` in logs; then ``z = -ndtri_exp(log p)``, polished
       by one Newton step on ``log_ndtr(-z) = log p``.

    In realistic maps nearly all voxels are in regime 1, so the cost is close to that of
    the naive formula.

    Examples
    --------
    >>> round(t_to_z(60.0, 1000), 2)
    39.06
    >>> round(t_to_z(-10.0, 200), 4)
    -8.9943
    """
    scalar_input = np.ndim(t) == 0 and np.ndim(df) == 0
    t_arr = np.asarray(t, dtype=np.float64)
    df_arr = np.asarray(df, dtype=np.float64)
    if np.any(df_arr <= 0):
        raise ValueError("degrees of freedom must be > 0")
    t_arr, df_arr = np.broadcast_arrays(t_arr, df_arr)
    shape = t_arr.shape
    # Work on 1-D arrays (0-d arrays decay to numpy scalars under ufuncs).
    t_arr = t_arr.reshape(-1)
    df_arr = df_arr.reshape(-1)
    at = np.abs(t_arr)

    # Regime 1 (bulk): direct tail probability.
    with np.errstate(invalid="ignore", divide="ignore", over="ignore", under="ignore"):
        p = special.stdtr(df_arr, -at)
        z = -special.ndtri(p)

        # Regime 2 (centre).
        central = p > _CENTRAL_P
        if np.any(central):
            ac = at[central]
            dfc = df_arr[central]
            r = ac * ac / dfc
            xc = r / (1.0 + r)  # t^2 / (df + t^2), no cancellation for small t
            c = special.betainc(0.5, 0.5 * dfc, xc)
            zc = np.sqrt(2.0) * special.erfinv(c)
            # Tiny |t| (t^2 may underflow): z = t * dz/dt(0) (relative error O(t^2)), with
            # dz/dt(0) = f_T(0) / φ(0) = sqrt(2 / df) Γ((df + 1) / 2) / Γ(df / 2).
            tiny = ac < _TINY_T
            if np.any(tiny):
                dft = dfc[tiny]
                slope = np.sqrt(2.0 / dft) * special.poch(0.5 * dft, 0.5)
                zc[tiny] = ac[tiny] * slope
            inf_dfc = np.isinf(dfc)
            zc[inf_dfc] = ac[inf_dfc]
            z[central] = zc

        # Regime 3 (far tail, incl. |t| = inf).
        far = p < _FAR_TAIL_P
        if np.any(far):
            z[far] = _far_tail_z(at[far], df_arr[far])

    z = np.copysign(z, t_arr).reshape(shape)
    if scalar_input:
        return float(z[()])
    return z


# ---------------------------------------------------------------------------------------
# Degrees of freedom
# ---------------------------------------------------------------------------------------

_DF_OFFSETS = {"n-2": 2, "n-1": 1}


def _lookup(mapping: Mapping[Any, Any] | None, key: Any) -> Any:
    """Look ``key`` up in a dict whose keys may be ``str`` or ``int``."""
    if not mapping or key is None:
        return None
    for k in (str(key), key):
        if k in mapping:
            return mapping[k]
    try:
        ik = int(key)
    except (TypeError, ValueError):
        return None
    return mapping.get(ik, mapping.get(str(ik)))


def _as_float(value: Any) -> float | None:
    """``float(value)`` when it is a finite number (or numeric string), else None."""
    if value is None or isinstance(value, bool):
        return None
    try:
        out = float(value)
    except (TypeError, ValueError, OverflowError):
        return None
    return out if math.isfinite(out) else None


#: A sample size written as text: decimal digits, optionally a fraction and an exponent. Python's
#: ``float()`` also reads "nan", "inf", "1_000" and more, none of which is a count of subjects.
_NUMBER_TEXT = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")


def _shown(value: Any) -> str:
    """``repr(value)``, cut to 40 characters (a reason names the value, not a whole document)."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _sample_size_value(source: str, value: Any) -> tuple[float | None, str | None]:
    """A candidate sample size from ``source`` as ``(number, None)``, ``(None, None)`` when absent, or
    ``(None, why)``.

    Absent: None, an empty string, or a float NaN (pandas' missing value in selection rows). Anything
    else that is not a finite number (``"twenty"``, ``"nan"``, ``"0x14"``, ``True``, ``inf``, ``1e400``)
    gets its own reason: it was given, so it must not pass as missing.
    """
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None, None
    if isinstance(value, str):
        text = value.strip()
        if not text:
            return None, None
        if not _NUMBER_TEXT.fullmatch(text):
            return None, f"implausible sample size: {source} {_shown(value)} is not a number"
    elif isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None, f"implausible sample size: {source} {_shown(value)} is not a number"
    try:
        out = float(value)
    except OverflowError:  # an integer of hundreds of digits
        return None, f"implausible sample size: {source} = {_shown(value)} is too large"
    if not math.isfinite(out):
        return None, f"implausible sample size: {source} = {_shown(value)} is not finite"
    return out, None


@dataclass(frozen=True)
class SampleSize:
    """An image's one resolved sample size and degrees of freedom (written to its qc.json).

    Attributes
    ----------
    n : int or None
        Sample size: ``number_of_subjects``, else ``conversion.n_images[id]``, else
        ``conversion.n_collections[collection_id]``, else ``n1 + n2`` of a declared two_sample design
        (the first usable one).
    n_source : str or None
        ``"number_of_subjects"``, ``"n_images"``, ``"n_collections"``, ``"design_images"`` or
        ``"design_collections"``.
    df : float or None
        Degrees of freedom (see :func:`resolve_sample_size` for the order), also for a Z map when
        they can be had (its effect sizes convert z back to t).
    df_source : str or None
        ``"statistic_parameters"``, the rule (``"n-2"``/``"n-1"``), ``"two_sample"``,
        ``"override_image"`` or ``"override_collection"``.
    reason : str or None
        Why the image must be excluded (unusable, implausible or conflicting n, or no df): None when
        usable. For a Z map only a problem with n is a reason (a Z map needs no df).
    """

    n: int | None
    n_source: str | None
    df: float | None
    df_source: str | None
    reason: str | None


def image_design(conversion: Mapping[str, Any], image_id: Any, collection_id: Any) -> tuple[dict, str | None]:
    """The declared design of an image and the table it comes from.

    ``conversion.design_images[id]``, else ``design_collections[collection_id]``, else
    ``({"design": "one_sample"}, None)``.
    """
    for table, key in (("design_images", image_id), ("design_collections", collection_id)):
        value = _lookup(conversion[table], key) if key is not None else None
        if value:
            return dict(value), table
    return {"design": "one_sample"}, None


def _n_candidates(record: Mapping[str, Any], conversion: Mapping[str, Any], design: dict, table: str | None):
    image_id = record.get("id", record.get("image_id"))
    yield "number_of_subjects", record.get("number_of_subjects")
    yield "n_images", _lookup(conversion["n_images"], image_id)
    yield "n_collections", _lookup(conversion["n_collections"], record.get("collection_id"))
    if design["design"] == "two_sample":
        # the user's own statement of the two group sizes: the image's n when nothing else gives one
        yield table, design["n1"] + design["n2"]


def _resolve_n(
    record: Mapping[str, Any], conversion: Mapping[str, Any], max_n: float | None
) -> tuple[int | None, str | None, str | None]:
    """``(n, n_source, reason)``: the first usable sample size, or why none is (None: simply absent)."""
    design, table = image_design(
        conversion, record.get("id", record.get("image_id")), record.get("collection_id")
    )
    problem: str | None = None
    n: int | None = None
    n_source: str | None = None
    for source, value in _n_candidates(record, conversion, design, table):
        v, why = _sample_size_value(source, value)
        if why is not None:
            problem = problem or why
            continue
        if v is None or v == 0:  # absent; NIDM maps are stored with n = 0
            continue
        if v < 0:
            problem = problem or f"implausible sample size: {source} = {v:g} is negative"
        elif v != math.floor(v):
            problem = problem or f"implausible sample size: {source} = {v:g} is not an integer"
        elif max_n is not None and v > max_n:
            problem = problem or f"implausible sample size: {source} = {v:g} > qc.max_n = {max_n:g}"
        else:
            n, n_source = int(v), source
            break
    if n is None:
        return None, None, None if problem is None else problem + " (set conversion.n_images to override)"
    if table is not None and design["design"] == "two_sample" and n_source != table:
        n1, n2 = design["n1"], design["n2"]
        if n1 + n2 != n:
            key = (
                record.get("id", record.get("image_id"))
                if table == "design_images"
                else record.get("collection_id")
            )
            return (
                None,
                None,
                (
                    f"sample size conflict: {n_source} = {n} but conversion.{table}[{key}] declares "
                    f"n1 + n2 = {n1} + {n2} = {n1 + n2} (an image has one n: fix n1 and n2)"
                ),
            )
    return n, n_source, None


def resolve_sample_size(
    record: Mapping[str, Any],
    conversion: Mapping[str, Any],
    max_n: float | None = None,
    need_df: bool = True,
) -> SampleSize:
    """Resolve an image's sample size ``n`` and degrees of freedom ``df`` once, with their sources.

    ``n`` is the first *usable* value of ``record["number_of_subjects"]``,
    ``conversion["n_images"][image_id]``, ``conversion["n_collections"][collection_id]`` and, for a map
    declared ``two_sample`` (``conversion.design_images`` / ``design_collections``), ``n1 + n2``. A missing
    value (None, empty, NaN) or zero (NIDM maps carry 0) is skipped. A value that is given but unusable
    (not a number: ``"twenty"``, ``"nan"``, ``"0x14"``; not finite: ``inf``, ``1e400``; negative; not an
    integer; above ``max_n``) is skipped too, so an override can replace it, and when no later source gives
    a usable ``n`` the image is excluded with that value named in the reason (a sample size never silently
    becomes another number, or missing). A two_sample design whose ``n1 + n2`` differs from the ``n`` found
    first excludes the image with both numbers in the reason: weights, df and effect sizes all read one n.

    ``df`` is then, in this order:

    1. ``record["statistic_parameters"]`` when finite, ``>= 1`` and ``<= n`` (when ``n`` is known); a
       value ``> n`` is ignored. With ``n`` unknown, a value ``> max_n`` excludes the image (a df cannot
       exceed the sample size).
    2. From ``n``: ``n1 + n2 - 2`` for a two_sample map (``"two_sample"``), else the rule
       ``conversion["df"]`` (``"n-2"`` default, ``"n-1"``): ``df = n - offset`` if ``n > offset``.
    3. ``conversion["df_images"][image_id]``, then ``conversion["df_collections"][collection_id]``.
    4. Otherwise excluded: ``"missing sample size"``, or, when ``n`` is known but too small to leave any
       df (``n = 1`` with the ``n-2`` rule), a reason saying so.

    Parameters
    ----------
    record : mapping
        NeuroVault image record (``id`` or ``image_id``, ``collection_id``, ``statistic_parameters``,
        ``number_of_subjects``; any may be missing, None, NaN, a string or a value of any JSON type).
    conversion : mapping or None
        ``config["conversion"]`` (``df``, ``df_images``, ``df_collections``, ``n_images``,
        ``n_collections``, ``design_images``, ``design_collections``; dict keys may be str or int).
    max_n : float, optional
        ``qc.max_n``: upper bound on a plausible ``n`` and ``df`` (None: no bound).
    need_df : bool
        False for Z maps: no df is not a reason (the df is still resolved when it can be, for their
        effect sizes).

    Returns
    -------
    SampleSize

    Raises
    ------
    ValueError
        If ``conversion["df"]`` is not ``"n-2"`` or ``"n-1"``.
    """
    rule = conversion["df"]
    if rule not in _DF_OFFSETS:
        raise ValueError(f"conversion.df must be 'n-2' or 'n-1', got {rule!r}")
    n, n_source, problem = _resolve_n(record, conversion, max_n)
    if problem is not None:
        return SampleSize(None, None, None, None, problem)
    df, df_source, reason = _resolve_df(record, conversion, n, n_source, rule, max_n)
    return SampleSize(n, n_source, df, df_source, reason if need_df else None)


def _resolve_df(
    record: Mapping[str, Any],
    conversion: Mapping[str, Any],
    n: int | None,
    n_source: str | None,
    rule: str,
    max_n: float | None,
) -> tuple[float | None, str | None, str | None]:
    """``(df, df_source, reason)`` of :func:`resolve_sample_size` once ``n`` is known (or absent)."""
    # 1. statistic_parameters
    sp = _as_float(record.get("statistic_parameters"))
    if sp is not None and sp >= 1 and (n is None or sp <= n):
        if n is None and max_n is not None and sp > max_n:
            return (
                None,
                None,
                f"implausible degrees of freedom: statistic_parameters = {sp:g} > qc.max_n = {max_n:g}",
            )
        return sp, "statistic_parameters", None

    # 2. from n: a declared two-sample map has n1 + n2 - 2, whatever the rule for one-sample maps
    design = image_design(conversion, record.get("id", record.get("image_id")), record.get("collection_id"))[
        0
    ]
    rule, offset = ("two_sample", 2) if design["design"] == "two_sample" else (rule, _DF_OFFSETS[rule])
    if n is not None and n > offset:
        return float(n - offset), rule, None

    # 3. overrides
    for mapping_key, source, key in (
        ("df_images", "override_image", record.get("id", record.get("image_id"))),
        ("df_collections", "override_collection", record.get("collection_id")),
    ):
        value = _as_float(_lookup(conversion[mapping_key], key))
        if value is not None and value > 0:
            return value, source, None

    if n is not None:
        return (
            None,
            None,
            (
                f"implausible sample size: {n_source} = {n} leaves no degrees of freedom for a t map "
                f"(df = n - {offset} = {n - offset} by the {rule!r} rule; set conversion.df_images to override)"
            ),
        )
    return None, None, MISSING_SAMPLE_SIZE


def unused_df_override(
    record: Mapping[str, Any], conversion: Mapping[str, Any], size: SampleSize
) -> str | None:
    """Why a ``conversion.df_images`` / ``df_collections`` value set for this image was not used, or None.

    Overrides come last in the df order (:func:`resolve_sample_size`): a record whose
    ``statistic_parameters`` or sample size gives a df ignores them. That is by design, but a config
    value that has no effect must be said (the z-map job logs it as a warning and qc.json keeps it).
    """
    if size.df is None or size.df_source in ("override_image", "override_collection"):
        return None
    for mapping_key, key in (
        ("df_images", record.get("id", record.get("image_id"))),
        ("df_collections", record.get("collection_id")),
    ):
        value = _lookup(conversion[mapping_key], key)
        if value is not None:
            return (
                f"conversion.{mapping_key}[{key}] = {value} not used: df = {size.df:g} from {size.df_source} "
                "comes first (the overrides apply only to images whose record gives no df or sample size)"
            )
    return None


def resolve_df(
    record: Mapping[str, Any], conversion: Mapping[str, Any]
) -> tuple[float | None, str | None, str | None]:
    """Degrees of freedom of a t map: ``(df, df_source, exclusion_reason)``.

    The df part of :func:`resolve_sample_size` (no ``max_n`` bound): ``(float, str, None)`` on success,
    ``(None, None, reason)`` otherwise (``"missing sample size"``, or an implausible, non-integral n).
    """
    s = resolve_sample_size(record, conversion)
    return s.df, s.df_source, s.reason
