"""The analysis overview page (nvmeta.figures.overview): summary sentences against planted inputs."""

from __future__ import annotations

import html
import json
import re

import nibabel as nib
import numpy as np
import pandas as pd

from nvmeta.figures.overview import analysis_summary, peak_of, write_overview

AFFINE = np.array([[-2.0, 0, 0, 90], [0, 2.0, 0, -126], [0, 0, 2.0, -72], [0, 0, 0, 1]])


def _inputs(tmp_path, n_fdr=1234, peak=-7.25):
    pd.DataFrame(
        {
            "stage": ["selected", "downloaded", "converted", "passed QC"],
            "count": [10, 9, 9, 7],
            "excluded_here": [0, 1, 0, 2],
            "reasons": ["", "1 × download failed: HTTP 404", "", "2 × duplicate of 5"],
        }
    ).to_csv(tmp_path / "funnel.tsv", sep="\t", index=False)
    pd.DataFrame(
        {
            "image_id": range(1, 11),
            "status": ["included"] * 7 + ["excluded"] * 3,
            "reason": [""] * 7 + ["download failed: HTTP 404", "duplicate of 5", "duplicate of 5"],
        }
    ).to_csv(tmp_path / "qc.tsv", sep="\t", index=False)
    d = tmp_path / "meta" / "stouffer"
    d.mkdir(parents=True)
    data = np.zeros((20, 20, 20), np.float32)
    data[3, 4, 5] = peak
    data[10, 10, 10] = 4.0
    nib.save(nib.Nifti1Image(data, AFFINE), d / "z_fdr.nii.gz")
    summary = {
        "k_maps": 7,
        "k_units": 7,
        "alpha": 0.05,
        "n_significant_fdr": n_fdr,
        "n_voxels_mask": 200_000,
        "n_clusters_fdr": 3,
        "n_significant_bonferroni": 99,
        "warnings": ["a warning"],
    }
    (d / "summary.json").write_text(json.dumps(summary))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(2, 1))
    fig.savefig(d / "z.png")
    fig.savefig(tmp_path / "mean.png")
    plt.close(fig)
    return d, summary


def test_peak_is_the_largest_absolute_value_in_mni_mm(tmp_path):
    d, _ = _inputs(tmp_path)
    z, xyz = peak_of(d / "z_fdr.nii.gz")
    assert z == -7.25
    assert xyz == (90 - 2 * 3, -126 + 2 * 4, -72 + 2 * 5)
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), AFFINE), tmp_path / "empty.nii.gz")
    assert peak_of(tmp_path / "empty.nii.gz") is None


def test_summary_states_funnel_exclusions_method_and_survivors(tmp_path):
    d, s = _inputs(tmp_path)
    text = analysis_summary(
        "pain",
        tmp_path / "funnel.tsv",
        tmp_path / "qc.tsv",
        {"stouffer": {"summary": s, "peak": peak_of(d / "z_fdr.nii.gz")}},
    )
    assert text.startswith(
        "Analysis pain: 10 images selected, 7 included (10 selected → 9 downloaded → 9 converted → 7 passed QC)."
    )
    assert "3 images were left out: 2 × duplicate of 5; 1 × download failed: HTTP 404." in text
    assert "The 7 maps were combined voxel by voxel with Stouffer's method" in text
    assert (
        "At a false discovery rate of q < 0.05, 1,234 voxels survived (1 % of the 200,000 brain voxels) in 3 clusters"
        in text
    )
    assert "the strongest is z = -7.2 at MNI (84, -118, -62) mm." in text  # -7.25: round half to even
    assert "Bonferroni correction, 99 voxels survived." in text


def test_summary_of_a_second_method(tmp_path):
    d, s = _inputs(tmp_path)
    meta = {
        "stouffer": {"summary": s, "peak": None},
        "fisher": {"summary": {**s, "n_significant_fdr": 5}, "peak": None},
    }
    text = analysis_summary("pain", tmp_path / "funnel.tsv", tmp_path / "qc.tsv", meta)
    assert text.count("were combined voxel by voxel") == 1
    assert (
        "Combined with Fisher's method (combining the maps' p-values) instead: "
        "At a false discovery rate of q < 0.05, 5 voxels survived" in text
    )


def test_summary_says_when_nothing_survived(tmp_path):
    d, s = _inputs(tmp_path, n_fdr=0)
    text = analysis_summary(
        "x", tmp_path / "funnel.tsv", tmp_path / "qc.tsv", {"fisher": {"summary": s, "peak": None}}
    )
    assert "No voxel survived the false discovery rate threshold (q < 0.05)." in text
    assert "voxels survived" not in text


def test_overview_page_is_self_contained(tmp_path):
    d, _ = _inputs(tmp_path)
    out = tmp_path / "overview.html"
    summary = write_overview(
        out,
        "pain",
        tmp_path / "funnel.tsv",
        tmp_path / "qc.tsv",
        meta_dirs={"stouffer": d},
        figures=[(tmp_path / "mean.png", "Mean z")],
    )
    page = out.read_text()
    assert summary in html.unescape(page)
    assert page.count('<img src="data:image/png;base64,') == 2
    assert "Warning: a warning" in page
    assert not re.search(r'(src|href)="(?!data:)', page)
    # the funnel table: one row per stage with its counts
    rows = re.findall(r"<tr><td>([^<]+)</td><td class='num'>([\d,]+)</td>", page)
    assert rows == [("selected", "10"), ("downloaded", "9"), ("converted", "9"), ("passed QC", "7")]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("overview")] == ["overview.html"]


def test_an_implausible_peak_is_not_headlined(tmp_path):
    """A method whose summary.json flags its peak (nvmeta.meta.plausibility) gets no count and no
    peak in the summary paragraph, but the flag; one whose peak passes keeps them, with a note
    when other voxels failed."""
    d, s = _inputs(tmp_path, peak=379.2)
    flagged = {**s, "plausibility": {"ok": False, "peak_ok": False, "n_voxels_over_bound": 1019,
                                     "message": "median: 1019 reported voxel(s) have |z| above ..."}}  # fmt: skip
    passing = {**s, "plausibility": {"ok": False, "peak_ok": True, "n_voxels_over_bound": 11, "message": "x"}}
    text = analysis_summary(
        "pain", tmp_path / "funnel.tsv", tmp_path / "qc.tsv",
        {"median": {"summary": flagged, "peak": peak_of(d / "z_fdr.nii.gz")},
         "ttest": {"summary": passing, "peak": (7.98, (0.0, -2.0, 4.0))}},
    )  # fmt: skip
    assert "379.2" not in text and "1,234 voxels survived" in text  # the count is the t-test's only
    assert text.count("voxels survived") == 2  # FDR and Bonferroni of the t-test
    assert (
        "Its result fails the plausibility check, so no count or peak of it is given here: "
        "median: 1019 reported voxel(s) have |z| above ..." in text
    )
    assert "the strongest is z = 8.0 at MNI (0, -2, 4) mm" in text
    assert "(11 voxels of it failed the plausibility check: see the warnings.)" in text
