"""First page of an analysis in the report: one line per result, the warnings grouped, the funnel.

:func:`write_overview` writes one self-contained HTML page (figures embedded as data URIs, no external
request) that Snakemake's report shows in its content pane, and a short card of it that the report's
landing page includes. Every line comes from :mod:`nvmeta.figures.facts`, read from the analysis' own
outputs. Optional further sections (e.g. decoding) are passed as :class:`~nvmeta.figures.facts.Line`
items and shown after the built-in ones.
"""

from __future__ import annotations

import base64
import html
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from nvmeta.figures import facts
from nvmeta.figures.facts import Line
from nvmeta.io import atomic_path

logger = logging.getLogger(__name__)
_LOGGER = logger

__all__ = ["collect_lines", "write_overview"]

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #0f172a; background: #fff;
       margin: 1.2rem auto; max-width: 72rem; padding: 0 1rem; line-height: 1.45; }
h1 { font-size: 1.5rem; margin: 0 0 .3rem; }
h2 { font-size: 1.1rem; margin: 1.3rem 0 .4rem; border-bottom: 1px solid #cbd5e1; }
p.funnel { margin: .2rem 0 .6rem; }
div.headline { font-size: 1.05rem; background: #f1f5f9; border-left: 4px solid #0f766e; padding: .6rem 1rem; }
div.headline.fail, li.fail > details > summary b, li.fail > div b { color: #9a3412; }
div.headline.fail { border-left-color: #b45309; background: #fef3c7; }
ul.lines, ul.warnings { list-style: none; padding: 0; margin: 0; }
ul.lines > li { padding: .3rem .5rem; border-bottom: 1px solid #e2e8f0; }
ul.lines > li.none { color: #475569; }
ul.lines > li.warn { background: #fffbeb; }
ul.lines > li.fail { background: #fef3c7; }
summary { cursor: pointer; }
span.more { color: #0f766e; font-size: .85rem; white-space: nowrap; }
ul.warnings > li { background: #fef3c7; border-left: 4px solid #b45309; padding: .35rem .8rem; margin: .3rem 0; }
ul.warnings ul { margin: .3rem 0 0 1rem; padding: 0; font-size: .9rem; }
table { border-collapse: collapse; font-size: .9rem; }
th, td { border: 1px solid #cbd5e1; padding: .25rem .6rem; text-align: left; vertical-align: top; }
th { background: #e2e8f0; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
figure { margin: .5rem 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #e2e8f0; }
figcaption { font-size: .85rem; color: #334155; }
p.note { font-size: .9rem; color: #334155; }
"""


def _esc(text: Any) -> str:
    return html.escape(str(text))


#: The report shows this page as a data: URL of its base64 (4/3 of its size), and Chromium loads no
#: URL beyond 2 MiB (it shows an empty pane): the page stays under this size, figures beyond it are
#: left to their own section of the report, and the line says so.
MAX_PAGE_BYTES = 1_450_000


def _encoded(path: str | os.PathLike) -> str:
    """A figure as base64 PNG, without its alpha channel (nvmeta's figures are opaque: lossless, ~10 % smaller)."""
    import io

    from PIL import Image

    with Image.open(path) as im:
        buf = io.BytesIO()
        im.convert("RGB").save(buf, format="PNG", optimize=True)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _img(data: str, caption: str) -> str:
    return (
        f'<figure><img src="data:image/png;base64,{data}" alt="{_esc(caption)}">'
        f"<figcaption>{_esc(caption)}</figcaption></figure>"
    )


def _embedded(lines: list[Line], head: Line | None, budget: int) -> dict[tuple[int, int], str]:
    """(line index, figure index) -> base64 of the figures the page embeds within ``budget`` bytes.

    In order: the headline's figures, the first figure of every section (inputs, effect sizes, CBMA,
    overlap, ICA, extra sections), of every other method, then the others; a figure that does not
    fit is skipped (a smaller one after it may).
    """
    order = [(i, k) for i, ln in enumerate(lines) if ln is head for k in range(len(ln.figures))]
    for methods in (False, True):
        order += [
            (i, 0)
            for i, ln in enumerate(lines)
            if ln is not head and ln.figures and (ln.kind == "method") == methods
        ]
    order += [(i, k) for i, ln in enumerate(lines) if ln is not head for k in range(1, len(ln.figures))]
    out, used = {}, 0
    for i, k in order:
        data = _encoded(lines[i].figures[k][0])
        if used + len(data) + 200 <= budget:
            out[(i, k)] = data
            used += len(data) + 200
    return out


def _paths(inputs: Mapping[str, Any], key: str) -> list[Path]:
    value = inputs.get(key)
    if value is None:
        return []
    return [Path(v) for v in ([value] if isinstance(value, (str, os.PathLike)) else value)]


def _one(inputs: Mapping[str, Any], key: str) -> Path | None:
    paths = _paths(inputs, key)
    return paths[0] if paths else None


def collect_lines(
    inputs: Mapping[str, Any], methods: Sequence[str], cbma_methods: Sequence[str] = ()
) -> tuple[Line, list[Line], list[tuple[str, str]]]:
    """The funnel line, the result lines (inputs, each method, effect sizes, CBMA, overlap, ICA) and
    every warning ``(source, text)``, from the overview rule's inputs (paths by role)."""
    funnel = facts.funnel_line(inputs["funnel"], inputs["qc"])
    lines: list[Line] = []
    warnings: list[tuple[str, str]] = []
    summaries = _paths(inputs, "summaries")
    if summaries:
        rows = facts.funnel_rows(inputs["funnel"])
        n = int(rows[-1]["count"]) if rows else 0
        lines.append(
            facts.inputs_line(
                n, _one(inputs, "mean_z"), _one(inputs, "coverage"), _one(inputs, "correlation")
            )
        )
    est = {p.parent.name: p for p in _paths(inputs, "est_png")}
    effects = {}
    for method, path, png in zip(
        methods, summaries, _paths(inputs, "z_png") or [None] * len(methods), strict=True
    ):
        s = facts.read_json(path)
        d = Path(path).parent
        shown = d / "z_fwe.nii.gz" if s.get("n_significant_fwe") is not None else d / "z_fdr.nii.gz"
        peak = facts.peak_of(shown) if shown.exists() else None
        lines.append(facts.method_line(method, s, peak, png, None))
        if method in est:
            effects[method] = s
        warnings += [(method, str(w)) for w in s.get("warnings", [])]
        plaus = s.get("plausibility") or {}
        if (
            plaus.get("ok") is False
            and plaus.get("message")
            and plaus["message"] not in s.get("warnings", [])
        ):
            warnings.append((method, str(plaus["message"])))
    eff = facts.effects_line(effects, est)
    if eff is not None:
        lines.append(eff)
    cbma = {
        m: facts.read_json(p) for m, p in zip(cbma_methods, _paths(inputs, "cbma_summaries"), strict=True)
    }
    cb = facts.cbma_line(cbma, dict(zip(cbma_methods, _paths(inputs, "cbma_png"), strict=True)))
    if cb is not None:
        lines.append(cb)
        warnings += [(m, str(w)) for m, s in cbma.items() for w in s.get("warnings", [])]
    if methods:
        ov = facts.overlap_line(_one(inputs, "overlap"), _one(inputs, "overlap_png"), methods[0])
        if ov is not None:
            lines.append(ov)
    ica = facts.read_json(_one(inputs, "ica_summary"))
    ic = facts.ica_line(
        ica, _one(inputs, "ica_terms"), _one(inputs, "ica_stability"), _paths(inputs, "ica_png")
    )
    if ic is not None:
        lines.append(ic)
        warnings += [("ica", str(w)) for w in (ica or {}).get("warnings", [])]
    dec_summary = facts.read_json(_one(inputs, "decode_summary"))
    dec = facts.decoding_line(_one(inputs, "decoding"), _one(inputs, "decoding_png"), dec_summary)
    if dec is not None:
        lines.append(dec)
        warnings += [("decode", str(w)) for w in (dec_summary or {}).get("warnings", [])]
    return funnel, lines, warnings


def _line_html(line: Line, figures: list[str | None], open_: bool = False) -> str:
    """One result line; its figures (base64, None: not embedded) one click away."""
    head = f"<b>{_esc(line.title)}</b> — {_esc(line.text)}"
    if not line.figures:
        return f"<li class='{line.status}'><div>{head}</div></li>"
    more = f" <span class='more'>[{facts.plural(len(line.figures), 'figure')}]</span>"
    shown = "".join(_img(d, cap) for d, (_, cap) in zip(figures, line.figures, strict=True) if d is not None)
    left = [cap for d, (_, cap) in zip(figures, line.figures, strict=True) if d is None]
    if left:
        where = f" under <em>{_esc(line.section)}</em>" if line.section else ""
        shown += f"<p class='note'>Not embedded (page size): {_esc('; '.join(left))}; see this analysis{where} in the report.</p>"
    return f"<li class='{line.status}'><details{' open' if open_ else ''}><summary>{head}{more}</summary>{shown}</details></li>"


def _warnings_html(groups: list[tuple[str, list[tuple[str, str]]]]) -> str:
    items = []
    for example, members in groups:
        sources = ", ".join(dict.fromkeys(s for s, _ in members))
        if len(members) == 1:
            items.append(f"<li>{_esc(example)}</li>")
            continue
        each = "".join(f"<li>{_esc(t)}</li>" for _, t in members)
        items.append(
            f"<li><details><summary><b>{len(members)} ×</b> ({_esc(sources)}): {_esc(example)}</summary>"
            f"<ul>{each}</ul></details></li>"
        )
    return f"<ul class='warnings'>{''.join(items)}</ul>"


def _funnel_table(funnel_tsv: str | os.PathLike) -> str:
    rows = [
        f"<tr><td>{_esc(r['stage'])}</td><td class='num'>{int(r['count']):,}</td>"
        f"<td class='num'>{int(r.get('excluded_here') or 0):,}</td><td>{_esc(r.get('reasons', ''))}</td></tr>"
        for r in facts.funnel_rows(funnel_tsv)
    ]
    return (
        "<table><thead><tr><th>stage</th><th>images</th><th>excluded here</th><th>reasons</th></tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table>"
    )


def _headline(lines: list[Line]) -> Line | None:
    """The first meta-analysis method's line (the configured order puts the main method first), else
    the first result line that is not about the inputs (e.g. the ICA's)."""
    return next((ln for ln in lines if ln.kind == "method"), None) or next(
        (ln for ln in lines if ln.title != "Input maps"), None
    )


def write_overview(
    out_html: str | os.PathLike,
    analysis: str,
    inputs: Mapping[str, Any],
    methods: Sequence[str] = (),
    cbma_methods: Sequence[str] = (),
    *,
    sections: Sequence[Line] = (),
    card_html: str | os.PathLike | None = None,
    logger: logging.Logger | None = None,
) -> str:
    """Write the analysis' first page (self-contained HTML) and its landing-page card; return the headline.

    Parameters
    ----------
    out_html : path-like
        Output (written atomically).
    analysis : str
        Analysis name.
    inputs : mapping
        Paths by role, as the rule ``overview`` declares them: ``funnel``, ``qc``; with a meta block
        ``summaries``, ``z_png`` (one per method, in ``methods`` order), ``est_png`` (effect-size
        methods), ``mean_z``, ``coverage``, ``correlation``; with a cbma block ``cbma_summaries``,
        ``cbma_png`` (``cbma_methods`` order), ``overlap``, ``overlap_png``; with an ica block
        ``ica_summary``, ``ica_terms``, ``ica_png``, optionally ``ica_stability``; with a decode block
        ``decoding``, ``decoding_png``, ``decode_summary``.
    methods, cbma_methods : sequence of str
        The configured meta-analysis and CBMA methods.
    sections : sequence of Line
        Further one-line sections with their figures (e.g. decoding), shown after the built-in ones.
    card_html : path-like, optional
        Where to write the landing-page card (an HTML fragment; no figures).
    logger : logging.Logger, optional
        Defaults to the module logger.

    Returns
    -------
    str
        The headline: the first method's line (or the funnel line without a meta block).
    """
    log = logger or _LOGGER
    funnel, lines, warnings = collect_lines(inputs, methods, cbma_methods)
    lines += list(sections)
    head = _headline(lines)
    groups = facts.group_warnings(warnings)
    headline = f"{head.title}: {head.text}" if head is not None else funnel.text
    cls = " fail" if head is not None and head.status == "fail" else ""

    def page_with(embedded: dict) -> str:
        body = [
            f"<h1>Analysis {_esc(analysis)}</h1>",
            f"<p class='funnel'>{_esc(funnel.text)}</p>",
            f"<div class='headline{cls}'>{_esc(headline)}</div>",
            "<h2>Results, one line each (click a line for its figures)</h2>",
            "<ul class='lines'>"
            + "".join(
                _line_html(ln, [embedded.get((i, k)) for k in range(len(ln.figures))], open_=ln is head)
                for i, ln in enumerate(lines)
            )
            + "</ul>",
        ]
        body += tail
        return (
            "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
            f"<title>{_esc(analysis)}: overview</title><style>{_CSS}</style></head><body>"
            + "\n".join(body)
            + "</body></html>\n"
        )

    tail = []
    if groups:
        tail += [
            f"<h2>Warnings: {facts.plural(len(warnings), 'warning')} of {facts.plural(len(groups), 'kind')}</h2>",
            _warnings_html(groups),
        ]
    tail += [
        "<h2>Funnel: selected → included</h2>",
        _funnel_table(inputs["funnel"]),
        "<p class='note'>A methods paragraph for the paper, generated from this run, with its BibTeX "
        "references: <em>Methods</em> of this analysis in the report (methods.html, references.bib).</p>",
    ]
    # room for the figures: what the page takes without them (and their "not embedded" notes)
    budget = MAX_PAGE_BYTES - len(page_with({}).encode("utf-8"))
    page = page_with(_embedded(lines, head, budget))
    with atomic_path(Path(out_html)) as tmp:
        Path(tmp).write_text(page, encoding="utf-8")
    if card_html is not None:
        _write_card(Path(card_html), funnel, headline, cls, lines, warnings, groups)
    log.info("overview of %s written: %s", analysis, headline)
    return headline


def _write_card(path: Path, funnel: Line, headline: str, cls: str, lines, warnings, groups) -> None:
    """The landing page's card of the analysis: funnel, headline, what else there is, the warnings count."""
    n_methods = sum(ln.kind == "method" for ln in lines)
    other = ([facts.plural(n_methods, "meta-analysis method")] if n_methods > 1 else []) + [
        ln.title for ln in lines if ln.kind != "method"
    ]
    parts = [
        f"<p class='nvmeta-funnel'>{_esc(funnel.text)}</p>",
        f"<p class='nvmeta-headline{cls}'>{_esc(headline)}</p>",
        f"<p class='nvmeta-more'>In its overview: {_esc('; '.join(other))}.</p>" if other else "",
        f"<p class='nvmeta-warn'>{facts.plural(len(warnings), 'warning')} of {facts.plural(len(groups), 'kind')}.</p>"
        if warnings
        else "",
    ]
    with atomic_path(path) as tmp:
        Path(tmp).write_text(f"<div class='nvmeta-card'>{''.join(parts)}</div>\n", encoding="utf-8")
