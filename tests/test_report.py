"""The Snakemake report, opened in a real headless browser (Debian's chromium).

A small demo-like run on a temp copy of the workflow against the bundled snapshot (analysis ``edge``:
the edge cases, Stouffer; a reduced ``pain``: 6 maps, Stouffer + Fisher, a 2-component ICA run twice),
then ``python -m snakemake --report report.html --configfile test.yaml`` in it, exactly as a user
would. The report is opened in chromium (installed with apt-get when missing and root; skipped with
the reason only when it cannot be had) and checked for: no request leaving the file, every analysis in
the rendered navigation, every expected result under it (overview page, funnel, QC, selection, input
figures and per-map table, each method's z mosaic and cluster table, sensitivity, each ICA component
figure labelled with its terms, term and stability tables) with its caption, images that decode at
their true size, a workflow description whose top is reachable, navigation text with a contrast of at
least 7:1 in every view (and the stock stylesheet failing that check), the overview page's numbers and
the inputs' per-map table against the run's own files and z-maps, and screenshots that are not blank.

Set ``NVMETA_REPORT_SHOTS=<dir>`` to keep the screenshots.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
from pathlib import Path

import pandas as pd
import pytest
import report_browser as rb
from helpers import SNAKEMAKE, SNAPSHOT, make_workdir, run_snakemake

pytestmark = pytest.mark.report

PAIN_IDS = [990001, 990002, 990003, 990004, 990005, 990006]
EDGE_IDS = [396069, 990031, 990032, 990033, 990034, 10426]
CONFIG = {
    "neurovault": {"url": "tests/data/snapshot", "mode": "download_new"},
    "template": {"mask": "mni152_2mm"},
    "conversion": {"df": "n-1"},
    "analyses": {
        "pain": {
            "image_ids": PAIN_IDS,
            "meta": {"methods": ["stouffer", "fisher", "permutation"], "n_perm": 200},
            "ica": {"n_components": 2, "n_runs": 2, "random_state": 0},
        },
        "edge": {"image_ids": EDGE_IDS, "meta": {"methods": ["stouffer"]}},
    },
}
REPORT_CMD = ["--report", "report.html", "--configfile", "test.yaml"]


def expected_results() -> dict[str, dict[str, set[str]]]:
    """analysis -> subcategory -> result paths the report must hold."""
    out = {}
    for name, spec in CONFIG["analyses"].items():
        d = f"results/analyses/{name}"
        subs = {
            "Selection and QC": {
                f"{d}/{f}" for f in ("selection.tsv", "qc.tsv", "funnel.tsv", "figures/qc_consensus.png")
            },
            "Analysis overview": {f"{d}/overview.html"},
            "Methods": {f"{d}/methods.html", f"{d}/references.bib"},
            "Inputs": {
                f"{d}/figures/{f}"
                for f in (
                    "inputs.tsv",
                    "inputs_mean_z.png",
                    "inputs_coverage.png",
                    "inputs_correlation.png",
                    "inputs_glass_brain.png",
                )
            },
        }
        methods = spec["meta"]["methods"]
        meta = {f"{d}/meta/{m}/{f}" for m in methods for f in ("z.png", "clusters.tsv", "jackknife.tsv")}
        if len(methods) > 1:
            meta.add(f"{d}/meta/sensitivity.tsv")
        subs["Meta-analysis"] = meta
        if spec.get("ica"):
            ica = {f"{d}/ica/component_{k}.png" for k in range(spec["ica"]["n_components"])}
            ica.add(f"{d}/ica/terms.tsv")
            ica.add(f"{d}/ica/stability.tsv")  # with one run too: the table then says so
            subs["ICA"] = ica
        out[name] = subs
    return out


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk."""
    head = Path(path).read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", path
    return struct.unpack(">II", head[16:24])


@pytest.fixture(scope="module")
def chrome():
    path, reason = rb.ensure_chromium(install=True)
    if path is None:
        pytest.skip(f"headless chromium unavailable, report not opened in a browser: {reason}")
    return path


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """The workflow run and its report: (workdir, report path, snakemake --report output)."""
    wf = make_workdir(tmp_path_factory.mktemp("report"), CONFIG, snapshot=SNAPSHOT)
    run_snakemake(wf)
    proc = subprocess.run(
        [*SNAKEMAKE, *REPORT_CMD],
        cwd=wf,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=600,
        env=dict(os.environ, PYTHONWARNINGS="ignore"),
    )
    assert proc.returncode == 0, proc.stdout[-5000:]
    assert "Report created" in proc.stdout, proc.stdout[-3000:]
    return wf, wf / "report.html", proc.stdout


@pytest.fixture(scope="module")
def probe(chrome, report):
    """Every view of the report app, walked in chromium."""
    return rb.probe_report(chrome, report[1])


@pytest.fixture(scope="module")
def shots_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("report_shots")


def keep_shot(png: Path) -> None:
    dest = os.environ.get("NVMETA_REPORT_SHOTS")
    if dest:
        Path(dest).mkdir(parents=True, exist_ok=True)
        shutil.copy2(png, Path(dest) / png.name)


def test_report_builds_without_rst_errors(report):
    _, html, log = report
    assert html.stat().st_size > 100_000
    # docutils prints "(ERROR/3)" / "(WARNING/2)" for broken captions (e.g. |z| read as a substitution)
    assert "ERROR/" not in log and "WARNING/" not in log and "SEVERE/" not in log, log[-3000:]


def test_report_is_self_contained(chrome, report, probe, tmp_path):
    _, html, _ = report
    text = html.read_text(encoding="utf-8")
    assert rb.external_references(text) == []
    # every result is embedded as a data: URI
    n_embedded = text.count('"data_uri": "data:')
    assert n_embedded == sum(len(p) for subs in expected_results().values() for p in subs.values())
    # at run time: no http(s) request from the page, on the landing page nor while walking every view
    landing = rb.dump_dom(chrome, html)
    assert landing.returncode == 0, landing.stderr[-3000:]
    assert landing.page_requests == []
    assert probe["page_requests"] == []
    # negative control: the same checks do flag a page that needs the network
    control = tmp_path / "control.html"
    control.write_text(
        '<html><head><link rel="stylesheet" href="https://cdn.example.org/s.css"></head>'
        '<body><img src="https://example.org/x.png"><script src="http://cdn.example.org/a.js"></script></body></html>'
    )
    assert len(rb.external_references(control.read_text())) == 3
    assert set(rb.dump_dom(chrome, control, budget_ms=2000).page_requests) >= {
        "https://example.org/x.png",
        "http://cdn.example.org/a.js",
    }


def test_landing_page_lists_every_analysis(chrome, report):
    wf, html, _ = report
    run = rb.dump_dom(chrome, html)
    visible = rb.visible_text(run.stdout)
    # the React app rendered (the static page only has the loading screen)
    assert "Results" in " ".join(visible) or "RESULTS" in " ".join(visible)
    assert "Workflow" in visible and "Statistics" in visible
    for name in CONFIG["analyses"]:
        assert name in visible, (name, visible[:40])
    joined = " ".join(visible)
    # workflow description, rendered from workflow/report/workflow.rst with the run's config
    assert "nvmeta: image-based meta-analysis and ICA of NeuroVault statistical maps" in joined
    # each analysis' card, as the run wrote it: its funnel and headline lines, and a link to the analysis
    import html as _html
    import re

    for name in CONFIG["analyses"]:
        card = (wf / f"results/analyses/{name}/overview_card.html").read_text()
        for para in re.findall(r"<p class='[^']*'>(.*?)</p>", card):
            assert _html.unescape(para) in joined, (name, para)
    assert run.stdout.count("javascript:app.showCategory(") >= len(CONFIG["analyses"])
    assert "Stouffer (6 maps): " in joined and "Stouffer (1 map): not computed: 1 usable map" in joined
    assert "stouffer" in joined and "fisher" in joined and "ICA with 2 components, 2 run(s)" in joined
    for cite in ("Stouffer et al. 1949", "Fisher 1925", "Benjamini & Hochberg 1995", "Fonov et al. 2011",
                 "DerSimonian & Laird 1986", "Peraza et al. 2025", "Turkeltaub et al. 2002", "Wager et al. 2007"):  # fmt: skip
        assert cite in joined, cite
    assert "|t| up to 1000" in joined
    assert "System Message" not in joined, "docutils error rendered into the report"


def test_every_analysis_and_result_is_in_the_app(probe, report):
    wf = report[0]
    assert probe["errors"] == []
    expected = expected_results()
    views = probe["views"]
    landing = [v for v in views if v["kind"] == "landing"]
    assert len(landing) == 1
    for name in expected:
        assert name in landing[0]["text"].split("\n"), name
    # categories and subcategories, as rendered by the app
    cats = {v["category"]: v for v in views if v["kind"] == "category"}
    assert set(cats) == set(expected)
    for name, subs in expected.items():
        lines = cats[name]["text"].split("\n")
        for sub in subs:
            assert sub in lines, (name, sub)
    subviews = {(v["category"], v["subcategory"]): v for v in views if v["kind"] == "subcategory"}
    assert set(subviews) == {(c, s) for c, subs in expected.items() for s in subs}
    results = [v for v in views if v["kind"] == "result"]
    got = {}
    for v in results:
        got.setdefault(v["category"], {}).setdefault(v["subcategory"], set()).add(v["path"])
    assert got == expected
    for v in results:
        sub = subviews[(v["category"], v["subcategory"])]
        # the subcategory table lists this result by its label values (not stale rows of another one)
        for value in v["labels"].values():
            assert value in sub["text"], (v["path"], value)
        text = v["text"]
        assert v["path"] in text  # path (so its file name: z.png, clusters.tsv, ...) in the breadcrumbs
        assert "DESCRIPTION" in text.upper(), v["path"]
        assert f"analysis {v['category']}" in text, f"caption of {v['path']} does not name its analysis"
        if v["mime"].startswith("image/"):
            shown = [i for i in v["images"] if i["embedded"] and i["width"] > 100]
            assert shown and (shown[-1]["width"], shown[-1]["height"]) == png_size(wf / v["path"]), v
        elif v["mime"] == "text/html":  # shown in the content pane (an iframe of the embedded page)
            assert any(f["embedded"] for f in v["iframes"]), v["path"]
        else:
            assert v["name"] in v["downloads"], v["path"]


def test_captions_and_labels_carry_the_analysis_details(probe, report):
    wf = report[0]
    by_path = {v["path"]: v for v in probe["views"] if v["kind"] == "result"}
    for method in ("stouffer", "fisher"):
        z = by_path[f"results/analyses/pain/meta/{method}/z.png"]
        assert z["labels"] == {"result": "z mosaic", "method": method}
        assert f"Meta-analytic z map ({method}) of analysis pain" in z["text"]
        cl = by_path[f"results/analyses/pain/meta/{method}/clusters.tsv"]
        assert cl["labels"] == {"result": "cluster table", "method": method}
    assert by_path["results/analyses/pain/meta/sensitivity.tsv"]["labels"]["result"] == "sensitivity"
    assert "max |z|" in by_path["results/analyses/pain/qc.tsv"]["text"]
    # each ICA component is labelled with its top terms, as written in terms.tsv
    terms = pd.read_csv(wf / "results/analyses/pain/ica/terms.tsv", sep="\t")
    for k in range(2):
        v = by_path[f"results/analyses/pain/ica/component_{k}.png"]
        top = terms[terms["component"] == k].sort_values("rank")["term"].astype(str).tolist()
        want = f"IC{k}: {', '.join(top)}" if top else f"IC{k}"
        assert v["labels"] == {"result": "component map", "component": want}
        assert "spatial ICA of analysis pain" in v["text"] and "3 top terms" in v["text"]
    assert terms["term"].notna().all() and len(terms) >= 1
    stab = by_path["results/analyses/pain/ica/stability.tsv"]
    assert "across 2 FastICA runs" in stab["text"]


def test_workflow_description_top_is_reachable(probe):
    """Snakemake centres the content pane; without the workaround in workflow.rst a description taller
    than the window overflows upwards out of reach (title at -380 px in a 1400x1000 window)."""
    landing = next(v for v in probe["views"] if v["kind"] == "landing")
    off = landing["content_offset"]
    assert off["content_height"] > off["pane_height"], "description fits: the check would be vacuous"
    assert off["top"] >= 0, off
    assert off["left"] >= 0, off


def _not_blank(png: Path) -> float:
    from PIL import Image

    img = Image.open(png).convert("RGB")
    assert img.size == (1400, 1000)
    small = img.resize((140, 100))
    colours = len(small.getcolors(maxcolors=small.width * small.height))
    assert colours > 50, f"{png}: {colours} colours, looks blank"
    return colours


def test_screenshots(chrome, report, shots_dir):
    wf, html, _ = report
    landing = shots_dir / "report_landing.png"
    run = rb.screenshot(chrome, html, landing, size=(1400, 1000))
    assert run.page_requests == []
    _not_blank(landing)
    keep_shot(landing)
    view = shots_dir / "report_pain_meta_stouffer.png"
    probe = rb.screenshot_view(chrome, html, view, "pain", "Meta-analysis", "stouffer/z.png")
    assert probe["errors"] == []
    final = probe["views"][-1]
    assert final["kind"] == "final"
    assert "z mosaic" in final["text"] and "stouffer" in final["text"]
    assert any(
        i["embedded"]
        and (i["width"], i["height"]) == png_size(wf / "results/analyses/pain/meta/stouffer/z.png")
        for i in final["images"]
    )
    _not_blank(view)
    keep_shot(view)
    # the command line with a category only (it crashed: "not enough values to unpack")
    assert rb.main([str(html), "--outdir", str(shots_dir), "--view", "pain", "--no-install"]) == 0
    _not_blank(shots_dir / "pain.png")
    print(f"screenshots: {landing} {view}")


# ---------------------------------------------------------------------------------------------
# Readable navigation, the overview page, the inputs' per-map table

MIN_NAV_CONTRAST = 7.0  # WCAG 2 AAA for normal text


def test_navigation_text_is_readable(probe):
    """Every text in the navigation, in every view, against what is behind it: contrast >= 7:1."""
    seen = [(v["kind"], v.get("path"), text, c) for v in probe["views"] for text, c in rb.nav_contrasts(v)]
    assert len(seen) > 100, "no navigation text found: the check would be vacuous"
    low = [s for s in seen if s[3] < MIN_NAV_CONTRAST]
    assert low == [], low[:10]
    # captions (shown in the navigation next to a result) are among the texts checked
    assert any(t.startswith("Funnel of analysis") for _, _, t, _ in seen)


def test_stock_navigation_fails_the_contrast_check(chrome, report, tmp_path):
    """Negative control: the same report without workflow/report/style.css (an empty stylesheet
    replaces the profile's) has navigation text under 7:1 (Snakemake's translucent slate panel)."""
    wf = report[0]
    empty = tmp_path / "empty.css"
    empty.write_text("")
    proc = subprocess.run(
        [
            *SNAKEMAKE,
            "--report",
            "stock.html",
            "--report-stylesheet",
            str(empty),
            "--configfile",
            "test.yaml",
        ],
        cwd=wf,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=600,
        env=dict(os.environ, PYTHONWARNINGS="ignore"),
    )
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "nvmeta's stylesheet" not in (wf / "stock.html").read_text(encoding="utf-8")
    assert "nvmeta's stylesheet" in report[1].read_text(encoding="utf-8")
    stock = rb.probe_report(chrome, wf / "stock.html")
    worst = min(c for v in stock["views"] for _, c in rb.nav_contrasts(v))
    assert worst < MIN_NAV_CONTRAST


def test_contrast_ratio_reference_values():
    # WCAG 2 reference points: black on white 21:1, white on white 1:1, #777 on white ~4.48:1
    assert rb.contrast_ratio((0, 0, 0), (255, 255, 255)) == pytest.approx(21.0)
    assert rb.contrast_ratio((255, 255, 255), (255, 255, 255)) == pytest.approx(1.0)
    assert rb.contrast_ratio((119, 119, 119), (255, 255, 255)) == pytest.approx(4.478, abs=1e-3)
    # 70 % slate-900 over white, as Snakemake's navigation panel
    assert rb.composite(["rgba(15, 23, 42, 0.7)"]) == pytest.approx((87.0, 92.6, 105.9), abs=0.01)


def _mask_and_zmaps(wf, ids):
    import nibabel as nib
    import numpy as np

    mask = np.asarray(nib.load(wf / "results/template/mask.nii.gz").dataobj) > 0
    return mask, {
        i: np.asarray(nib.load(wf / f"results/images/{i}/zmap.nii.gz").dataobj, dtype=np.float64)[mask]
        for i in ids
    }


def test_inputs_table_matches_the_zmaps(report):
    """figures/inputs.tsv against numpy on the z-maps, qc.tsv, qc.json and selection.tsv."""
    import json

    import numpy as np

    from nvmeta.figures.plotting import INPUT_TABLE_COLUMNS

    wf = report[0]
    for name in CONFIG["analyses"]:
        d = wf / "results/analyses" / name
        table = pd.read_csv(d / "figures/inputs.tsv", sep="\t", keep_default_na=False, na_values=[""])
        qc = pd.read_csv(d / "qc.tsv", sep="\t", keep_default_na=False, na_values=[""])
        sel = pd.read_csv(d / "selection.tsv", sep="\t")
        assert list(table.columns) == INPUT_TABLE_COLUMNS
        assert table["image_id"].tolist() == qc["image_id"].tolist() == sel["image_id"].tolist()
        inc = qc["status"] == "included"
        assert table["included"].tolist() == inc.tolist()
        assert table.loc[~inc, "reason"].tolist() == qc.loc[~inc, "reason"].tolist()
        assert table.loc[inc, "reason"].isna().all()
        assert all(isinstance(r, str) and r for r in table.loc[~inc, "reason"])
        assert table["collection_id"].tolist() == sel["collection_id"].tolist()
        ids = table.loc[inc, "image_id"].tolist()
        assert len(ids) >= (6 if name == "pain" else 1), name
        mask, z = _mask_and_zmaps(wf, ids)
        by_id = table.set_index("image_id")
        for i in ids:
            v = z[i]
            assert by_id.loc[i, "max_abs_z"] == pytest.approx(np.nanmax(np.abs(v)), rel=1e-5), (name, i)
            assert by_id.loc[i, "coverage"] == pytest.approx(np.isfinite(v).mean(), abs=2e-6), (name, i)
            others = []
            for o in ids:
                if o != i:
                    both = np.isfinite(v) & np.isfinite(z[o])
                    others.append(np.corrcoef(v[both], z[o][both])[0, 1])
            if others:
                assert by_id.loc[i, "mean_r"] == pytest.approx(np.mean(others), abs=1e-6), (name, i)
            else:  # the only included map: no other map to correlate with
                assert pd.isna(by_id.loc[i, "mean_r"]), (name, i)
        for i in table["image_id"]:
            n = json.loads((wf / f"results/images/{i}/qc.json").read_text())["n"]
            got = by_id.loc[i, "n"]
            assert (pd.isna(got) and n is None) or got == n, (name, i)
        # the pain maps' n is their number of subjects (no override in this config)
        if name == "pain":
            assert (
                by_id.loc[ids, "n"].tolist()
                == sel.set_index("image_id").loc[ids, "number_of_subjects"].tolist()
            )
            assert (
                by_id.loc[ids, "contrast"] == sel.set_index("image_id").loc[ids, "contrast_definition"]
            ).all()


def test_overview_page_states_the_funnel_and_results(report, probe):
    """The overview's facts against the run's own files: funnel, every method's counts (the permutation
    test's FWE line), peaks from the thresholded maps, the ICA's component count."""
    import json

    import nibabel as nib
    import numpy as np

    wf = report[0]
    by_path = {v["path"]: v for v in probe["views"] if v["kind"] == "result"}
    labels = {"stouffer": "Stouffer", "fisher": "Fisher", "permutation": "Permutation t-test"}
    for name, spec in CONFIG["analyses"].items():
        d = wf / "results/analyses" / name
        page = (d / "overview.html").read_text(encoding="utf-8")
        assert rb.external_references(page) == []
        text = " ".join(rb.visible_text(page))
        funnel = pd.read_csv(d / "funnel.tsv", sep="\t", keep_default_na=False)
        chain = " → ".join(f"{int(r['count']):,} {r['stage']}" for r in funnel.to_dict("records"))
        assert chain in text, (chain, text[:500])
        selected, included = int(funnel["count"].iloc[0]), int(funnel["count"].iloc[-1])
        assert f"{selected:,} images selected, {included:,} included" in text
        if selected > included:
            qc = pd.read_csv(d / "qc.tsv", sep="\t", keep_default_na=False)
            for reason in qc.loc[qc["status"] != "included", "reason"].value_counts().index[:3]:
                assert reason in text, reason
        for method in spec["meta"]["methods"]:
            s = json.loads((d / f"meta/{method}/summary.json").read_text())
            maps = f"{s['k_maps']} map{'s' * (s['k_maps'] != 1)}"
            assert f"{labels[method]} ({maps}) — " in text, method
            if s["k_units"] < s["min_maps_effective"]:
                assert f"{labels[method]} ({maps}) — not computed: {s['k_units']} usable map" in text
                continue
            if method == "permutation":  # its own family-wise error result first
                n = s["n_significant_fwe"]
                assert f"{labels[method]} ({maps}) — {n:,} voxels at FWE p < 0.05 (permutation)" in text
                assert f"FDR q < 0.05: {s['n_significant_fdr']:,}" in text
                shown = d / f"meta/{method}/z_fwe.nii.gz"
            else:
                n = s["n_significant_fdr"]
                assert (f"{n:,} voxels at FDR q < 0.05" if n else "no voxel survives FDR q < 0.05") in text
                shown = d / f"meta/{method}/z_fdr.nii.gz"
            assert f"Bonferroni: {s['n_significant_bonferroni']:,}" in text
            if n:
                img = nib.load(shown)
                data = np.nan_to_num(np.asarray(img.dataobj, dtype=np.float64))
                ijk = np.unravel_index(np.argmax(np.abs(data)), data.shape)
                x, y, zz = nib.affines.apply_affine(img.affine, ijk)
                assert f"peak z = {data[ijk]:.1f} at MNI ({x:.0f}, {y:.0f}, {zz:.0f}) mm" in text, method
        if spec.get("ica"):
            ica = json.loads((d / "ica/summary.json").read_text())
            assert ica["n_components"] == spec["ica"]["n_components"]
            assert (
                f"ICA — {ica['n_components']} components from {ica['n_maps']} maps (FastICA, 2 runs" in text
            )
            for title in ica["titles"]:
                assert title in text
        # small enough for the report to show it (a data: URL under 2 MiB in Chromium)
        from nvmeta.figures.overview import MAX_PAGE_BYTES

        assert len(page.encode("utf-8")) <= MAX_PAGE_BYTES
        # each figure once: every method's mosaic, the three input figures, the ICA components
        assert page.count('<img src="data:image/png;base64,') == len(spec["meta"]["methods"]) + 3 + (
            (spec.get("ica") or {}).get("n_components", 0)
        )
        # in the app: the first subcategory of the analysis, shown in the content pane
        v = by_path[f"results/analyses/{name}/overview.html"]
        assert v["subcategory"] == "Analysis overview"
        assert any(f["embedded"] and f["length"] > 10_000 for f in v["iframes"]), v["iframes"]
    cat = next(x for x in probe["views"] if x["kind"] == "category" and x["category"] == "pain")
    subs = [line for line in cat["text"].split("\n") if line in expected_results()["pain"]]
    assert subs[0] == "Analysis overview", subs


def test_methods_paragraph_and_its_references(report):
    """Every key the paragraph cites has its BibTeX entry; the counts it gives are the run's."""
    import html
    import re

    wf = report[0]
    for name, spec in CONFIG["analyses"].items():
        d = wf / "results/analyses" / name
        page = (d / "methods.html").read_text(encoding="utf-8")
        latex = html.unescape(re.search(r"<pre>(.*)</pre>", page, flags=re.S).group(1))
        cited = {k for m in re.finditer(r"\\citep\{([^}]*)\}", latex) for k in m.group(1).split(",")}
        bib = (d / "references.bib").read_text(encoding="utf-8")
        entries = set(re.findall(r"^@\w+\{([^,]+),", bib, flags=re.M))
        assert cited and cited == entries, cited ^ entries
        funnel = pd.read_csv(d / "funnel.tsv", sep="\t", keep_default_na=False)
        chain = ", ".join(f"{int(r['count']):,} {r['stage']}" for r in funnel.to_dict("records"))
        assert f"Images: {chain}." in latex
        assert "Stouffer's method" in latex and "Benjamini" not in latex  # cited by key in the LaTeX
        assert "(Benjamini & Hochberg, 1995)" in html.unescape(page)  # and by author-year in the text
        if "permutation" in spec["meta"]["methods"]:
            assert "the permutation test used 200 sign flips" in latex


def test_screenshots_of_the_overview_and_inputs(chrome, report, shots_dir):
    wf, html, _ = report
    for sub, result in (("Analysis overview", "overview.html"), ("Inputs", "inputs_correlation.png")):
        png = shots_dir / f"report_pain_{sub.replace(' ', '_')}.png"
        probe = rb.screenshot_view(chrome, html, png, "pain", sub, result)
        assert probe["errors"] == []
        final = probe["views"][-1]
        if result.endswith(".png"):
            assert any(
                i["embedded"]
                and (i["width"], i["height"]) == png_size(wf / f"results/analyses/pain/figures/{result}")
                for i in final["images"]
            )
        else:
            assert any(f["embedded"] for f in final["iframes"])
        _not_blank(png)
        keep_shot(png)
