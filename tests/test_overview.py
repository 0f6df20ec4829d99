"""The analysis overview page and its lines (nvmeta.figures.overview / facts) against planted outputs.

Every expected line is written out here from the planted summary.json / tsv values (hand references);
the workflow-level check against a real run's summaries is in tests/test_report.py.
"""

from __future__ import annotations

import html
import json
import re

import matplotlib
import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from nvmeta.figures import facts
from nvmeta.figures.facts import Line, peak_of
from nvmeta.figures.overview import collect_lines, write_overview

matplotlib.use("Agg")

AFFINE = np.array([[-2.0, 0, 0, 90], [0, 2.0, 0, -126], [0, 0, 2.0, -72], [0, 0, 0, 1]])
CLUSTER_WARNING = (
    "{m}: clusters.tsv has a cluster of {n} voxels, {p}% of the reported voxels (FDR q < 0.05): it says little "
    "about where the effect is; set meta.cluster_threshold_z (e.g. 5) for a stricter cluster-forming threshold"
)
COLLECTION_WARNING = "collection 7 contributes 7 maps, treated as independent (meta.combine_within: none)"


def _png(path):
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(2, 1))
    fig.savefig(path)
    plt.close(fig)
    return path


def _z(path, peak):
    data = np.zeros((20, 20, 20), np.float32)
    if peak is not None:
        data[3, 4, 5] = peak
        data[10, 10, 10] = 4.0
    nib.save(nib.Nifti1Image(data, AFFINE), path)


def _summary(method, **kw):
    s = {
        "method": method, "k_maps": 7, "k_units": 7, "min_maps_effective": 2, "alpha": 0.05,
        "n_voxels_mask": 200_000, "n_voxels_reported": 150_000, "n_significant_fdr": 1234,
        "n_clusters_fdr": 3, "n_significant_bonferroni": 99, "warnings": [COLLECTION_WARNING],
    }  # fmt: skip
    s.update(kw)
    return s


@pytest.fixture
def run(tmp_path):
    """A planted analysis: funnel, QC (5 exclusion reasons), 4 methods, CBMA, overlap, ICA."""
    pd.DataFrame(
        {
            "stage": ["selected", "downloaded", "converted", "passed QC"],
            "count": [13, 12, 11, 7],
            "excluded_here": [0, 1, 1, 4],
            "reasons": ["", "1 × download failed: HTTP 404", "1 × missing sample size", "..."],
        }
    ).to_csv(tmp_path / "funnel.tsv", sep="\t", index=False)
    reasons = ["download failed: HTTP 404", "missing sample size", "duplicate of 5", "duplicate of 5",
               "low coverage: 0.1 < 0.5", "too many volumes: 2"]  # fmt: skip
    pd.DataFrame(
        {
            "image_id": range(1, 14),
            "status": ["included"] * 7 + ["excluded"] * 6,
            "reason": [""] * 7 + reasons,
        }
    ).to_csv(tmp_path / "qc.tsv", sep="\t", index=False)
    methods = {
        "stouffer": (_summary("stouffer", warnings=[COLLECTION_WARNING, CLUSTER_WARNING.format(m="stouffer", n=129614, p=55)]), -7.25),
        "permutation": (_summary("permutation", n_significant_fwe=321, n_clusters_fwe=2, n_significant_fdr=1000,
                                 warnings=[COLLECTION_WARNING, CLUSTER_WARNING.format(m="permutation", n=8752, p=46)]), 6.5),
        "dersimonian_laird": (_summary("dersimonian_laird", est_min=-0.5, est_max=0.97, I2_median=0.35), 5.0),
        "median": (_summary("median", est_min=-0.4, est_max=1.2, I2_median=0.3,
                            plausibility={"ok": False, "peak_ok": False, "n_voxels_over_bound": 12,
                                          "message": "median: 12 reported voxel(s) have |z| above the bound"}), 379.2),
    }  # fmt: skip
    inputs = {"funnel": tmp_path / "funnel.tsv", "qc": tmp_path / "qc.tsv", "summaries": [], "z_png": [],
              "est_png": []}  # fmt: skip
    for m, (s, peak) in methods.items():
        d = tmp_path / "meta" / m
        d.mkdir(parents=True)
        (d / "summary.json").write_text(json.dumps(s))
        _z(d / "z_fdr.nii.gz", peak if m != "permutation" else 9.9)  # permutation: its FWE map is shown
        if m == "permutation":
            _z(d / "z_fwe.nii.gz", peak)
        inputs["summaries"].append(d / "summary.json")
        inputs["z_png"].append(_png(d / "z.png"))
        if m in ("dersimonian_laird", "median"):
            inputs["est_png"].append(_png(d / "est.png"))
    for key in ("mean_z", "coverage", "correlation"):
        inputs[key] = _png(tmp_path / f"inputs_{key}.png")
    cb = tmp_path / "cbma"
    for m, n_cl in (("ale", 12), ("mkda", 0)):
        (cb / m).mkdir(parents=True)
        (cb / m / "summary.json").write_text(json.dumps({
            "n_maps": 7, "n_experiments": 7, "n_foci": 35, "n_iters": 100, "cluster_threshold": 0.05,
            "n_clusters": n_cl, "n_significant_cluster_fwe": 4238 if n_cl else 0,
            "warnings": ["ale: only 7 experiment(s)"] if m == "ale" else []}))  # fmt: skip
    inputs["cbma_summaries"] = [cb / "ale/summary.json", cb / "mkda/summary.json"]
    inputs["cbma_png"] = [_png(cb / "ale.png"), _png(cb / "mkda.png")]
    pd.DataFrame(
        [
            dict(ibma_method="stouffer", cbma_method="ale", cbma_level="cluster", dice=0.0632, n_cbma_clusters=12,
                 n_matched_clusters=11, peak_distance_median_mm=2.83),
            dict(ibma_method="stouffer", cbma_method="ale", cbma_level="voxel", dice=0.5, n_cbma_clusters=1,
                 n_matched_clusters=1, peak_distance_median_mm=1.0),
            dict(ibma_method="stouffer", cbma_method="mkda", cbma_level="cluster", dice=0.0, n_cbma_clusters=0,
                 n_matched_clusters=0, peak_distance_median_mm=np.nan),
        ]
    ).to_csv(tmp_path / "overlap.tsv", sep="\t", index=False)  # fmt: skip
    inputs["overlap"], inputs["overlap_png"] = tmp_path / "overlap.tsv", _png(tmp_path / "ibma_vs_cbma.png")
    ica = tmp_path / "ica"
    ica.mkdir()
    # 4 components computed, 2 of them with terms (terms.tsv lists only those)
    (ica / "summary.json").write_text(json.dumps({
        "n_components": 4, "n_maps": 7, "n_runs": 3, "converged": [True, True, True],
        "titles": ["IC0: pain, heat", "IC1 (no term loads positively)", "IC2 (no term loads positively)", "IC3: pain"],
        "warnings": []}))  # fmt: skip
    pd.DataFrame({"component": [0, 0, 3], "rank": [1, 2, 1], "term": ["pain", "heat", "pain"]}).to_csv(
        ica / "terms.tsv", sep="\t", index=False
    )
    pd.DataFrame({"component": range(4), "mean_abs_corr": [0.88, 0.66, 0.7, 0.9], "min_abs_corr": 0.5,
                  "n_runs": 3}).to_csv(ica / "stability.tsv", sep="\t", index=False)  # fmt: skip
    inputs.update(ica_summary=ica / "summary.json", ica_terms=ica / "terms.tsv", ica_stability=ica / "stability.tsv",
                  ica_png=[_png(ica / f"component_{k}.png") for k in range(4)])  # fmt: skip
    return tmp_path, inputs, list(methods), ["ale", "mkda"]


def test_peak_is_the_largest_absolute_value_in_mni_mm(tmp_path):
    _z(tmp_path / "z.nii.gz", -7.25)
    z, xyz = peak_of(tmp_path / "z.nii.gz")
    assert z == -7.25
    assert xyz == (90 - 2 * 3, -126 + 2 * 4, -72 + 2 * 5)
    _z(tmp_path / "empty.nii.gz", None)
    assert peak_of(tmp_path / "empty.nii.gz") is None


def test_one_line_per_result_with_the_planted_facts(run):
    _, inputs, methods, cbma = run
    funnel, lines, _ = collect_lines(inputs, methods, cbma)
    assert funnel.text == (
        "13 images selected, 7 included (13 selected → 12 downloaded → 11 converted → 7 passed QC). 6 left out: "
        "2 × duplicate of 5; 1 × download failed: HTTP 404; 1 × missing sample size; "
        "2 more for 2 other reasons (see the funnel table)."
    )
    by = {ln.title: ln for ln in lines}
    assert list(by) == [
        "Input maps", "Stouffer (7 maps)", "Permutation t-test (7 maps)", "DerSimonian–Laird (7 maps)",
        "Median g (7 maps)", "Effect sizes (Hedges' g)", "CBMA (coordinate-based)",
        "IBMA (Stouffer, FDR) vs CBMA clusters", "ICA",
    ]  # fmt: skip
    assert by["Stouffer (7 maps)"].text == (
        "1,234 voxels at FDR q < 0.05 (1 % of 200,000 brain voxels) in 3 clusters; Bonferroni: 99; "
        "peak z = -7.2 at MNI (84, -118, -62) mm."  # -7.25: round half to even
    )
    # the permutation test's own family-wise error result first, its peak from the FWE map
    assert by["Permutation t-test (7 maps)"].text == (
        "321 voxels at FWE p < 0.05 (permutation) (0 % of 200,000 brain voxels) in 2 clusters; "
        "FDR q < 0.05: 1,000; Bonferroni: 99; peak z = 6.5 at MNI (84, -118, -62) mm."
    )
    # an implausible result is never given as a number
    median = by["Median g (7 maps)"]
    assert median.status == "fail" and "379" not in median.text and "1,234" not in median.text
    assert median.text == (
        "result not headlined: it fails the plausibility check "
        "(median: 12 reported voxel(s) have |z| above the bound)."
    )
    assert by["Effect sizes (Hedges' g)"].text == (
        "DerSimonian–Laird: g -0.50 to 0.97, median I² 0.35; Median g: g -0.40 to 1.20, median I² 0.30 "
        "(g over the reported voxels; I² as a fraction, 0–1)."
    )
    assert by["CBMA (coordinate-based)"].text == (
        "NiMARE on the peaks of 7 maps (7 experiments, 35 foci, 100 Monte-Carlo iterations): ALE 12 clusters "
        "(4,238 voxels); MKDA no cluster at cluster-level FWE p < 0.05."
    )
    assert by["IBMA (Stouffer, FDR) vs CBMA clusters"].text == (
        "ALE Dice 0.06, 11/12 clusters on IBMA ones (median peak distance 2.8 mm); MKDA Dice 0.00."
    )
    # the number of components computed (4), not of those with terms (2)
    assert by["ICA"].text == (
        "4 components from 7 maps (FastICA, 3 runs; stability: mean |r| with the other runs 0.66 to 0.90): "
        "IC0: pain, heat; IC1 (no term loads positively); IC2 (no term loads positively); IC3: pain."
    )
    assert [len(by[t].figures) for t in by] == [3, 1, 1, 1, 1, 2, 2, 1, 4]


def test_a_method_that_could_not_run_says_so():
    s = _summary("stouffer", k_maps=1, k_units=1, n_voxels_reported=0, n_significant_fdr=0)
    line = facts.method_line("stouffer", s, None)
    assert line.title == "Stouffer (1 map)"
    assert line.text == "not computed: 1 usable map (at least 2 needed)."
    nothing = facts.method_line(
        "fisher", _summary("fisher", n_significant_fdr=0, n_significant_bonferroni=0), None
    )
    assert nothing.text == "no voxel survives FDR q < 0.05; Bonferroni: 0."


def test_warnings_are_grouped_by_kind_and_counted(run):
    _, inputs, methods, cbma = run
    _, _, warnings = collect_lines(inputs, methods, cbma)
    groups = facts.group_warnings(warnings)
    sizes = {example: [s for s, _ in members] for example, members in groups}
    assert sizes[COLLECTION_WARNING] == methods  # the same text from every method: one group
    cluster = [e for e in sizes if "clusters.tsv has a cluster" in e]
    assert len(cluster) == 1 and sizes[cluster[0]] == ["stouffer", "permutation"]  # numbers differ
    assert "median: 12 reported voxel(s) have |z| above the bound" in sizes
    assert "ale: only 7 experiment(s)" in sizes
    assert sum(len(m) for _, m in groups) == len(warnings) == 4 + 2 + 1 + 1


def test_overview_page_and_card(run):
    root, inputs, methods, cbma = run
    out = root / "overview.html"
    extra = Line("Decoding", "planted decoding line.", [(inputs["mean_z"], "decoding figure")])
    headline = write_overview(
        out, "pain", inputs, methods, cbma, sections=[extra], card_html=root / "card.html"
    )
    page = out.read_text()
    text = html.unescape(re.sub(r"<[^>]+>", " ", page))
    assert headline == "Stouffer (7 maps): " + facts.method_line("stouffer", json.loads(
        (root / "meta/stouffer/summary.json").read_text()), peak_of(root / "meta/stouffer/z_fdr.nii.gz")).text  # fmt: skip
    assert f"<div class='headline'>{html.escape(headline)}</div>" in page
    assert "Decoding" in text and "planted decoding line." in text
    # 3 inputs + 4 method z maps + 2 est + 2 CBMA + 1 overlap + 4 ICA + 1 decoding, each once
    assert page.count('<img src="data:image/png;base64,') == 17
    assert not re.search(r'(src|href)="(?!data:)', page)
    assert "Warnings: 8 warnings of 4 kinds" in text
    assert re.search(
        r"<b>4 ×</b> \(stouffer, permutation, dersimonian_laird, median\): " + re.escape(COLLECTION_WARNING),
        html.unescape(page),
    )
    rows = re.findall(r"<tr><td>([^<]+)</td><td class='num'>([\d,]+)</td>", page)
    assert rows == [("selected", "13"), ("downloaded", "12"), ("converted", "11"), ("passed QC", "7")]
    card = (root / "card.html").read_text()
    assert html.escape(headline) in card and "8 warnings of 4 kinds" in card
    assert "<img" not in card


def test_an_implausible_first_method_is_not_headlined(run):
    root, inputs, methods, cbma = run
    order = ["median", "stouffer", "permutation", "dersimonian_laird"]
    inputs = {**inputs, "summaries": [root / f"meta/{m}/summary.json" for m in order],
              "z_png": [root / f"meta/{m}/z.png" for m in order]}  # fmt: skip
    headline = write_overview(root / "o.html", "pain", inputs, order, cbma)
    assert headline.startswith("Median g (7 maps): result not headlined: it fails the plausibility check")
    assert "379" not in (root / "o.html").read_text()
    assert "<div class='headline fail'>" in (root / "o.html").read_text()


def test_analysis_without_meta_block_headlines_its_ica(run):
    root, inputs, _, _ = run
    keep = {k: inputs[k] for k in ("funnel", "qc", "ica_summary", "ica_terms", "ica_png")}
    headline = write_overview(root / "ica.html", "tz", keep)
    assert headline.startswith("ICA: 4 components from 7 maps (FastICA, 3 runs)")


def test_page_stays_under_what_the_report_can_show(run):
    """Snakemake shows the page as a data: URL of its base64; Chromium shows nothing beyond 2 MiB.
    With large figures the page stays under MAX_PAGE_BYTES: the headline's figure and one of each
    section first, and each line names the figures it leaves to the report's sections."""
    import matplotlib.pyplot as plt

    from nvmeta.figures.overview import MAX_PAGE_BYTES

    root, inputs, methods, cbma = run
    rng = np.random.default_rng(1)
    noisy = set()
    for key in ("z_png", "est_png", "cbma_png", "ica_png"):
        for path in inputs[key]:
            fig = plt.figure(figsize=(6, 3), dpi=100)
            fig.figimage(rng.random((300, 600, 3)))  # incompressible: ~0.5 MB each
            fig.savefig(path)
            plt.close(fig)
            noisy.add(path)
    total = sum(p.stat().st_size for p in noisy)
    assert total * 4 / 3 > 2 * MAX_PAGE_BYTES  # the figures cannot all fit
    write_overview(root / "big.html", "pain", inputs, methods, cbma)
    page = (root / "big.html").read_text()
    assert len(page.encode()) <= MAX_PAGE_BYTES
    assert MAX_PAGE_BYTES * 4 / 3 < 2 * 2**20
    # the headline's figure is embedded (its line is open), the others are named where left out
    head = re.search(
        r"<details open><summary><b>Stouffer \(7 maps\)</b>.*?</details>", page, flags=re.S
    ).group(0)
    assert '<img src="data:image/png;base64,' in head
    assert "Not embedded (page size):" in page and "see this analysis under <em>Meta-analysis</em>" in page
    n_figures = 3 + 4 + 2 + 2 + 1 + 4
    named = sum(
        len(m.group(1).split("; ")) for m in re.finditer(r"Not embedded \(page size\): (.*?); see this", page)
    )
    assert page.count('<img src="data:image/png;base64,') + named == n_figures


def test_decoding_line_names_each_result_maps_closest_terms(tmp_path):
    """The overview's decoding line: per source its top terms with r and p, or why it has none."""
    import pandas as pd

    from nvmeta.figures import facts

    rows = [
        {"source": "meta/stouffer", "term": "pain task", "r": 0.61, "rank": 1, "p_null": 0.002, "note": ""},
        {"source": "meta/stouffer", "term": "n-back", "r": 0.12, "rank": 2, "p_null": 0.4, "note": ""},
        {"source": "ica/component_0", "term": "pain task", "r": None, "rank": None, "p_null": None,
         "note": "0 map(s) after leaving out 21"},
    ]  # fmt: skip
    tsv = tmp_path / "decoding.tsv"
    pd.DataFrame(rows).to_csv(tsv, sep="\t", index=False)
    line = facts.decoding_line(tsv, tmp_path / "decoding.png", {"warnings": []})
    assert line.title == "Decoding" and line.status == "ok"
    assert "meta/stouffer resembles pain task (r = 0.61, p = 0.002); n-back (r = 0.12, p = 0.4)" in line.text
    assert "ica/component_0: no atlas term to decode against (0 map(s) after leaving out 21)" in line.text
    assert facts.decoding_line(tmp_path / "absent.tsv", None, None) is None
    only_none = pd.DataFrame(rows[2:])
    only_none.to_csv(tsv, sep="\t", index=False)
    assert facts.decoding_line(tsv, None, None).status == "none"
