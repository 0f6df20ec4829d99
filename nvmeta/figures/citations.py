"""How each method is named and described to a reader, and what it cites (one table for the overview,
the report's landing page and the methods paragraph).

Citations are BibTeX keys. Those in NiMARE's own reference list (``nimare.utils``'
:func:`~nimare.utils.get_description_references`, the list NiMARE's boilerplate cites from) are taken
from NiMARE; :data:`BIBTEX` holds the entries NiMARE does not have.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["BIBTEX", "CBMA_METHODS", "IBMA_METHODS", "REFS", "MethodText", "bibtex", "cite", "short_cite"]


@dataclass(frozen=True)
class MethodText:
    """A method as the reader sees it: a short label, one sentence, the references."""

    label: str
    sentence: str
    cites: tuple[str, ...]


#: Image-based methods, keyed by their registry name (``meta.methods``).
IBMA_METHODS: dict[str, MethodText] = {
    "stouffer": MethodText(
        "Stouffer", "Stouffer's method (the sum of the maps' z values over √k)", ("stouffer1949american",)
    ),
    "weighted_stouffer": MethodText(
        "Weighted Stouffer",
        "Stouffer's method with each map weighted by the square root of its sample size",
        ("stouffer1949american", "zaykin2011optimally"),
    ),
    "fisher": MethodText(
        "Fisher",
        "Fisher's method (−2 Σ ln p against χ² with 2k degrees of freedom, two-sided as the concordant test)",
        ("fisher1925statistical", "winkler2016nonparametric"),
    ),
    "ttest": MethodText(
        "t-test",
        "a random-effects one-sample t-test of the maps' z values (k − 1 degrees of freedom)",
        ("holmes1998generalisability",),
    ),
    "permutation": MethodText(
        "Permutation t-test",
        "a sign-flipping permutation test of the one-sample t with max-statistic family-wise error control "
        "(nilearn's permuted_ols test)",
        ("nichols2002nonparametric", "winkler2014permutation"),
    ),
    "dersimonian_laird": MethodText(
        "DerSimonian–Laird",
        "random-effects pooling of the maps' Hedges' g with the DerSimonian–Laird between-study variance",
        ("dersimonian1986meta", "hedges1985statistical"),
    ),
    "hedges": MethodText(
        "Hedges random effects",
        "random-effects pooling of Hedges' g with Hedges' between-study variance estimator",
        ("hedges1985statistical",),
    ),
    "fixed_effects_hedges": MethodText(
        "Fixed-effects Hedges",
        "inverse-variance (fixed-effect) pooling of the maps' Hedges' g",
        ("hedges1985statistical",),
    ),
    "median": MethodText(
        "Median g",
        "the median of the maps' Hedges' g with a MAD-based standard error (robust to outlying maps)",
        ("peraza2025advancing",),
    ),
    "trimmed_mean": MethodText(
        "Trimmed mean g",
        "the γ-trimmed mean of the maps' Hedges' g with its winsorised standard error (robust)",
        ("peraza2025advancing", "yuen1974two"),
    ),
}

#: Coordinate-based methods (``cbma.methods``), run by NiMARE on the peaks nvmeta extracts.
CBMA_METHODS: dict[str, MethodText] = {
    "ale": MethodText(
        "ALE", "activation likelihood estimation", ("turkeltaub2002meta", "eickhoff2012activation")
    ),
    "mkda": MethodText("MKDA", "multilevel kernel density analysis", ("wager2007meta",)),
    "kda": MethodText("KDA", "kernel density analysis", ("wager2004neuroimaging",)),
}

#: Other references the texts cite, by role.
REFS = {
    "neurovault": "gorgolewski2015neurovault",
    "nilearn": "10.3389/fninf.2014.00014",
    "nimare": "Salo2023",
    "snakemake": "molder2021sustainable",
    "t_to_z": "hughett2008accurate",
    "template": "fonov2011unbiased",
    "fdr": "benjamini1995controlling",
    "bonferroni": "bonferroni1936teoria",
    "i2": "higgins2002quantifying",
    "ica": "hyvarinen1999fast",
    "ica_brain": "varoquaux2010group",
    "sklearn": "pedregosa2011scikit",
    "ale_experiments": "eickhoff2016behavior",
}

#: Author-year text of every key the texts cite (the HTML paragraph; the .bib has the entries).
_SHORT = {
    "stouffer1949american": "Stouffer et al., 1949",
    "zaykin2011optimally": "Zaykin, 2011",
    "fisher1925statistical": "Fisher, 1925",
    "winkler2016nonparametric": "Winkler et al., 2016",
    "holmes1998generalisability": "Holmes & Friston, 1998",
    "nichols2002nonparametric": "Nichols & Holmes, 2002",
    "winkler2014permutation": "Winkler et al., 2014",
    "dersimonian1986meta": "DerSimonian & Laird, 1986",
    "hedges1985statistical": "Hedges & Olkin, 1985",
    "peraza2025advancing": "Peraza et al., 2025",
    "yuen1974two": "Yuen, 1974",
    "turkeltaub2002meta": "Turkeltaub et al., 2002",
    "eickhoff2012activation": "Eickhoff et al., 2012",
    "eickhoff2016behavior": "Eickhoff et al., 2016",
    "wager2007meta": "Wager et al., 2007",
    "wager2004neuroimaging": "Wager et al., 2004",
    "gorgolewski2015neurovault": "Gorgolewski et al., 2015",
    "10.3389/fninf.2014.00014": "Abraham et al., 2014",
    "Salo2023": "Salo et al., 2023",
    "molder2021sustainable": "Mölder et al., 2021",
    "hughett2008accurate": "Hughett, 2008",
    "fonov2011unbiased": "Fonov et al., 2011",
    "benjamini1995controlling": "Benjamini & Hochberg, 1995",
    "bonferroni1936teoria": "Bonferroni, 1936",
    "higgins2002quantifying": "Higgins & Thompson, 2002",
    "hyvarinen1999fast": "Hyvärinen, 1999",
    "varoquaux2010group": "Varoquaux et al., 2010",
    "pedregosa2011scikit": "Pedregosa et al., 2011",
}

#: BibTeX of the cited references that NiMARE's reference list does not hold.
BIBTEX: dict[str, str] = {
    "fisher1925statistical": """@book{fisher1925statistical,
  title={Statistical Methods for Research Workers},
  author={Fisher, Ronald A},
  publisher={Oliver and Boyd},
  address={Edinburgh},
  year={1925}
}""",
    "hedges1985statistical": """@book{hedges1985statistical,
  title={Statistical Methods for Meta-Analysis},
  author={Hedges, Larry V and Olkin, Ingram},
  publisher={Academic Press},
  address={Orlando},
  year={1985}
}""",
    "gorgolewski2015neurovault": """@article{gorgolewski2015neurovault,
  title={NeuroVault.org: a web-based repository for collecting and sharing unthresholded statistical maps of the human brain},
  author={Gorgolewski, Krzysztof J and Varoquaux, Gael and Rivera, Gabriel and Schwarz, Yannick and Ghosh, Satrajit S and Maumet, Camille and Sochat, Vanessa V and Nichols, Thomas E and Poldrack, Russell A and Poline, Jean-Baptiste and Yarkoni, Tal and Margulies, Daniel S},
  journal={Frontiers in Neuroinformatics},
  volume={9},
  pages={8},
  year={2015},
  doi={10.3389/fninf.2015.00008}
}""",
    "winkler2016nonparametric": """@article{winkler2016nonparametric,
  title={Non-parametric combination and related permutation tests for neuroimaging},
  author={Winkler, Anderson M and Webster, Matthew A and Brooks, Jonathan C and Tracey, Irene and Smith, Stephen M and Nichols, Thomas E},
  journal={Human Brain Mapping},
  volume={37},
  number={4},
  pages={1486--1511},
  year={2016},
  doi={10.1002/hbm.23115}
}""",
    "holmes1998generalisability": """@article{holmes1998generalisability,
  title={Generalisability, random effects and population inference},
  author={Holmes, Andrew P and Friston, Karl J},
  journal={NeuroImage},
  volume={7},
  number={4},
  pages={S754},
  year={1998}
}""",
    "nichols2002nonparametric": """@article{nichols2002nonparametric,
  title={Nonparametric permutation tests for functional neuroimaging: a primer with examples},
  author={Nichols, Thomas E and Holmes, Andrew P},
  journal={Human Brain Mapping},
  volume={15},
  number={1},
  pages={1--25},
  year={2002},
  doi={10.1002/hbm.1058}
}""",
    "peraza2025advancing": """@article{peraza2025advancing,
  title={Advancing image-based meta-analysis for fMRI: a framework for leveraging NeuroVault data},
  author={Peraza, Julio A and others},
  journal={Scientific Reports},
  year={2025},
  doi={10.1038/s41598-025-20328-8}
}""",
    "yuen1974two": """@article{yuen1974two,
  title={The two-sample trimmed t for unequal population variances},
  author={Yuen, Karen K},
  journal={Biometrika},
  volume={61},
  number={1},
  pages={165--170},
  year={1974},
  doi={10.1093/biomet/61.1.165}
}""",
    "molder2021sustainable": """@article{molder2021sustainable,
  title={Sustainable data analysis with Snakemake},
  author={M{\\"o}lder, Felix and Jablonski, Kim Philipp and Letcher, Brice and Hall, Michael B and Tomkins-Tinch, Christopher H and Sochat, Vanessa and Forster, Jan and Lee, Soohyun and Twardziok, Sven O and Kanitz, Alexander and Wilm, Andreas and Holtgrewe, Manuel and Rahmann, Sven and Nahnsen, Sven and K{\\"o}ster, Johannes},
  journal={F1000Research},
  volume={10},
  pages={33},
  year={2021},
  doi={10.12688/f1000research.29032.2}
}""",
    "fonov2011unbiased": """@article{fonov2011unbiased,
  title={Unbiased average age-appropriate atlases for pediatric studies},
  author={Fonov, Vladimir and Evans, Alan C and Botteron, Kelly and Almli, C Robert and McKinstry, Robert C and Collins, D Louis},
  journal={NeuroImage},
  volume={54},
  number={1},
  pages={313--327},
  year={2011},
  doi={10.1016/j.neuroimage.2010.07.033}
}""",
    "higgins2002quantifying": """@article{higgins2002quantifying,
  title={Quantifying heterogeneity in a meta-analysis},
  author={Higgins, Julian P T and Thompson, Simon G},
  journal={Statistics in Medicine},
  volume={21},
  number={11},
  pages={1539--1558},
  year={2002},
  doi={10.1002/sim.1186}
}""",
    "hyvarinen1999fast": """@article{hyvarinen1999fast,
  title={Fast and robust fixed-point algorithms for independent component analysis},
  author={Hyv{\\"a}rinen, Aapo},
  journal={IEEE Transactions on Neural Networks},
  volume={10},
  number={3},
  pages={626--634},
  year={1999},
  doi={10.1109/72.761722}
}""",
    "varoquaux2010group": """@article{varoquaux2010group,
  title={A group model for stable multi-subject ICA on fMRI datasets},
  author={Varoquaux, Gael and Sadaghiani, Sepideh and Pinel, Philippe and Kleinschmidt, Andreas and Poline, Jean-Baptiste and Thirion, Bertrand},
  journal={NeuroImage},
  volume={51},
  number={1},
  pages={288--299},
  year={2010},
  doi={10.1016/j.neuroimage.2010.02.010}
}""",
    "pedregosa2011scikit": """@article{pedregosa2011scikit,
  title={Scikit-learn: Machine learning in Python},
  author={Pedregosa, Fabian and Varoquaux, Ga{\\"e}l and Gramfort, Alexandre and Michel, Vincent and Thirion, Bertrand and Grisel, Olivier and Blondel, Mathieu and Prettenhofer, Peter and Weiss, Ron and Dubourg, Vincent and Vanderplas, Jake and Passos, Alexandre and Cournapeau, David and Brucher, Matthieu and Perrot, Matthieu and Duchesnay, {\\'E}douard},
  journal={Journal of Machine Learning Research},
  volume={12},
  pages={2825--2830},
  year={2011}
}""",
}

_CITE = re.compile(r"\\citep\{([^}]*)\}")


def cite(*keys: str) -> str:
    r"""A LaTeX citation of ``keys`` (``\citep{a,b}``), the form NiMARE's descriptions use."""
    return "\\citep{" + ",".join(keys) + "}"


def short_cite(text: str) -> str:
    r"""``text`` with every ``\citep{...}`` replaced by "(Author, year; ...)"."""
    return _CITE.sub(lambda m: "(" + "; ".join(_SHORT.get(k, k) for k in m.group(1).split(",")) + ")", text)


def bibtex(text: str) -> tuple[str, list[str]]:
    """The BibTeX entries of every key ``text`` cites; keys found nowhere (none expected).

    NiMARE's entries come from :func:`nimare.utils.get_description_references`, the others from
    :data:`BIBTEX`; entries are in order of first citation.
    """
    from nimare.utils import get_description_references

    keys = list(dict.fromkeys(k for m in _CITE.finditer(text) for k in m.group(1).split(",")))
    theirs = [k for k in keys if k not in BIBTEX]
    nimare_bib = get_description_references(cite(*theirs)) if theirs else ""
    found = {}
    for entry in re.split(r"\n(?=@)", nimare_bib.strip()) if nimare_bib.strip() else []:
        m = re.match(r"@\w+\{([^,]+),", entry.strip())
        if m:
            found[m.group(1)] = entry.strip()
    out, missing = [], []
    for k in keys:
        entry = BIBTEX.get(k) or found.get(k)
        (out.append(entry) if entry else missing.append(k))
    return "\n\n".join(out) + "\n", missing
