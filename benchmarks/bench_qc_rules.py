"""QC rules on planted truth: how many planted bad maps each rule catches, how many good maps it loses.

A synthetic selection on the MNI 2 mm template (:func:`nvmeta.testing.qc_planted.write_qc_selection`:
good maps sharing one pattern, bad maps of every kind the rules target, converted by the real
per-image job) goes through nvmeta's QC (:func:`nvmeta.images.qc.build_qc`, schema defaults) and,
side by side on the same maps, through the criteria of the references, re-implemented here from
their description: Peraza et al. 2025 (NBCLab/large-scale-ibma, ``outlier.py``) and the OHBM 2025
NeuroVault IBMA tutorial. Those are: substring name terms (ica, pca, ppi, seed, functional
connectivity, correlation), ``cope`` without ``zstat``/``tstat`` and ``tfce`` in the file name,
max |z| < 1.96, |z| > 50, all-positive or all-negative maps, coverage > 40 %, |r| within 0.01 of 1
for duplicates, and both IQR fences on each map's slope against the voxelwise median (on the
signal voxels, 10 % at each end; g approximated by z / sqrt(n)).

A planted map counts as caught by a rule when that rule is the reason it is excluded (or the flag
it carries); a good map is lost to a rule when that rule excludes or flags it. Also printed: the r
with the consensus of the planted inverted, other-task and pure-noise maps (the margin of
``qc.inverted_r = -0.2``) and the cost of the consensus rules in the QC job (first selection, best of 3).

Usage::

    python benchmarks/bench_qc_rules.py [--good 40] [--seeds 0 1 2] [--noise 3]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nvmeta.images.qc import build_qc  # noqa: E402
from nvmeta.images.record_rules import file_name  # noqa: E402
from nvmeta.images.template import load_mask  # noqa: E402
from nvmeta.testing.qc_planted import BAD_KINDS, write_qc_selection  # noqa: E402
from nvmeta.workflow.config import defaults  # noqa: E402

#: planted kind -> the rule meant to catch it (its reason or flag prefix in qc.tsv).
RULES = {
    "name": ("name filter", "not a task contrast: name"),
    "file": ("file-name filter", "not a task contrast: file name"),
    "single_subject": ("single subject labelled group", "single-subject map labelled group"),
    "low_coverage": ("coverage < 0.4", "low coverage"),
    "weak": ("max |z| < 1.96", "max |z| < 1.96"),
    "huge": ("max |z| > 50", "max |z| > 50"),
    "duplicate": ("duplicate", "duplicate of image"),
    "flipped_copy": ("sign-flipped copy", "sign-flipped copy of image"),
    "inverted": ("inverted contrast", "inverted contrast"),
    "outlier": ("outlier (other task)", "outlier"),
    "noise": ("outlier (noise only)", "outlier"),
}
REF_TERMS = ["ica", "pca", "ppi", "seed", "functional connectivity", "correlation"]
#: image id -> r with the median of all maps, the map included (filled by reference_verdicts).
R_WITH_ITSELF: dict[int, float] = {}


def nvmeta_verdicts(qc: pd.DataFrame) -> dict[int, list[str]]:
    """Image id -> the texts of its exclusion reason and flags."""
    out = {}
    for row in qc.itertuples():
        texts = [t for t in (row.reason, row.flags) if isinstance(t, str) and t]
        out[int(row.image_id)] = [part for t in texts for part in t.split("; ")]
    return out


def reference_verdicts(root: Path, sel: pd.DataFrame, mask: np.ndarray) -> dict[int, list[str]]:
    """The references' criteria on the maps the per-image job converted, each criterion on its own.

    The duplicate and slope rules run on the maps that pass the references' z-range and coverage
    criteria (they need a clean set for the median), whatever their names.
    """
    import json

    from scipy.stats import linregress

    out: dict[int, list[str]] = {}
    kept, maps, ns = [], [], []
    for rec in sel.to_dict("records"):
        image_id = int(rec["image_id"])
        qc = json.loads((root / "images" / str(image_id) / "qc.json").read_text())
        if qc["status"] != "included":
            out[image_id] = ["per-image job: " + str(qc["reason"])]
            continue
        name, fname = str(rec["name"]).lower(), file_name(rec["file"]).lower()
        z = np.asarray(nib.load(root / "images" / str(image_id) / "zmap.nii.gz").dataobj)[mask]
        vals = z[np.isfinite(z)]
        # each criterion on its own (the substring name test alone would hide the others)
        why = []
        if any(term in name for term in REF_TERMS):
            why.append("not a task contrast: name")
        if ("cope" in fname and "zstat" not in fname and "tstat" not in fname) or "tfce" in fname:
            why.append("not a task contrast: file name")
        content = []
        if qc["coverage"] <= 0.4:
            content.append("low coverage")
        if vals.max() < 1.96 and vals.min() > -1.96:
            content.append("max |z| < 1.96")
        if np.abs(vals).max() > 50:
            content.append("max |z| > 50")
        if (vals > 0).all() or (vals < 0).all():
            content.append("all positive or all negative")
        out[image_id] = why + content
        if content:
            continue
        kept.append(image_id)
        maps.append(z)
        ns.append(float(qc["n"]))
    maps = np.array(maps)
    # duplicates: |r| within 0.01 of 1 (the tutorial); keep the map closer to the mean image
    full = np.where(np.isfinite(maps), maps, 0.0)
    corr = np.corrcoef(full)
    mean_r = np.corrcoef(np.vstack([full, full.mean(0)]))[-1, :-1]
    drop = set()
    for i in range(len(kept)):
        for j in range(i + 1, len(kept)):
            if i in drop or j in drop or not np.isclose(abs(corr[i, j]), 1, atol=1e-2):
                continue
            # a copy: either one (the tutorial picks at random); a flipped pair: the one farther from the mean
            loser = j if corr[i, j] > 0 or mean_r[i] > mean_r[j] else i
            drop.add(loser)
            out[kept[loser]].append("sign-flipped copy of image" if corr[i, j] < 0 else "duplicate of image")
    rest = [m for m in range(len(kept)) if m not in drop]
    # nvmeta's r, but against the median of all maps, each map included (no leave-one-out)
    med_z = np.nanmedian(maps[rest], axis=0)
    okz = np.isfinite(med_z)
    lo_z, hi_z = np.quantile(med_z[okz], [0.1, 0.9])
    sig_z = okz & ((med_z <= lo_z) | (med_z >= hi_z))
    for m in rest:
        x = maps[m]
        use = sig_z & np.isfinite(x)
        R_WITH_ITSELF[kept[m]] = float(np.corrcoef(x[use], med_z[use])[0, 1])
    # Peraza et al.'s slopes of g (here z / sqrt(n)) on the median on the signal voxels, both IQR fences
    g = maps[rest] / np.sqrt(np.array(ns)[rest])[:, None]
    med = np.nanmedian(g, axis=0)
    ok = np.isfinite(med)
    lo, hi = np.quantile(med[ok], [0.1, 0.9])
    sig = ok & ((med <= lo) | (med >= hi))
    slopes = np.array([linregress(med[sig & np.isfinite(x)], x[sig & np.isfinite(x)]).slope for x in g])
    q1, q3 = np.percentile(slopes, [25, 75])
    for m, s in zip(rest, slopes, strict=True):
        if s < q1 - 1.5 * (q3 - q1) or s > q3 + 1.5 * (q3 - q1):
            out[kept[m]].append(
                "outlier" if s > 0 else "inverted contrast (negative slope, below the lower fence)"
            )
    return out


def tally(verdicts: dict[int, list[str]], truth: dict[int, str], counts: dict, side: str) -> None:
    """Add caught / planted / good lost per rule for one selection."""
    for kind, (label, prefix) in RULES.items():
        row = counts.setdefault(label, {"planted": 0})
        ids = [i for i, k in truth.items() if k == kind]
        if side == "nvmeta":
            row["planted"] += len(ids)
        hit = [i for i in ids if any(t.startswith(prefix) for t in verdicts.get(i, []))]
        # the reference calls an inverted map an outlier of its slope: credit it either way
        if side == "reference" and kind in ("inverted",):
            hit = [i for i in ids if any(t.startswith(("inverted", "outlier")) for t in verdicts.get(i, []))]
        any_rule = [i for i in ids if verdicts.get(i)]
        good = [i for i, k in truth.items() if k == "good"]
        lost = [i for i in good if any(t.startswith(prefix) for t in verdicts.get(i, []))]
        row[f"{side}_caught"] = row.get(f"{side}_caught", 0) + len(hit)
        row[f"{side}_any"] = row.get(f"{side}_any", 0) + len(any_rule)
        row[f"{side}_lost"] = row.get(f"{side}_lost", 0) + len(lost)
    if side == "nvmeta":
        counts.setdefault("_good", {"n": 0})["n"] += sum(1 for k in truth.values() if k == "good")
    lost_any = [i for i, k in truth.items() if k == "good" and verdicts.get(i)]
    counts["_good"][side] = counts["_good"].get(side, 0) + len(lost_any)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--good", type=int, default=40, help="good maps per selection")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--noise", type=int, default=3, help="pure-noise maps per selection")
    parser.add_argument("--sigma", type=float, default=4.0, help="sd of the pattern's blobs, voxels")
    parser.add_argument("--noise-sigma", type=float, default=2.0, help="smoothing sd of the noise, voxels")
    args = parser.parse_args(argv)
    mask_img = load_mask("mni152_2mm")
    mask = np.asarray(mask_img.dataobj) > 0
    counts: dict = {}
    r_by_kind: dict[str, list[float]] = {}
    r_self: dict[str, list[float]] = {}
    seconds = {"on": np.inf, "off": np.inf}
    n_maps = 0
    for seed in args.seeds:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            t0 = time.perf_counter()
            sel_path, truth = write_qc_selection(
                root, mask_img, n_good=args.good, bad={**BAD_KINDS, "noise": args.noise}, seed=seed,
                sigma_vox=args.sigma, noise_sigma_vox=args.noise_sigma,
            )  # fmt: skip
            made = time.perf_counter() - t0
            sel = pd.read_csv(sel_path, sep="\t", dtype=str, keep_default_na=False)
            n_maps += len(sel)
            image_dir = (root / "images").joinpath
            # the first selection is timed (best of 3, interleaved: the node is shared)
            for _ in range(3 if seed == args.seeds[0] else 1):
                for key, cfg in (("off", {"inverted": "off", "outliers": "off"}), ("on", {})):
                    t0 = time.perf_counter()
                    qc, _ = build_qc(
                        sel_path,
                        lambda i, d=image_dir: d(str(i)),
                        {**defaults("qc"), **cfg},
                        mask_img=mask_img,
                    )
                    if seed == args.seeds[0]:
                        seconds[key] = min(seconds[key], time.perf_counter() - t0)
            tally(nvmeta_verdicts(qc), truth, counts, "nvmeta")
            tally(reference_verdicts(root, sel, mask), truth, counts, "reference")
            for row in qc.itertuples():
                if np.isfinite(row.consensus_r):
                    r_by_kind.setdefault(truth[int(row.image_id)], []).append(float(row.consensus_r))
            for image_id, r in R_WITH_ITSELF.items():
                r_self.setdefault(truth[image_id], []).append(r)
            R_WITH_ITSELF.clear()
            print(f"seed {seed}: {len(sel)} maps written in {made:.1f} s", file=sys.stderr)
    good = counts.pop("_good")
    print(
        f"{len(args.seeds)} selections of {args.good} good maps + planted bad maps ({n_maps} maps), MNI 2 mm\n"
    )
    print(
        "| rule | planted | nvmeta: caught by the rule | excluded or flagged (any rule) | good maps lost "
        "| references: caught | good maps lost |"
    )
    print("|---|---|---|---|---|---|---|")
    for label, row in counts.items():
        print(f"| {label} | {row['planted']} | {row['nvmeta_caught']} | {row['nvmeta_any']} | {row['nvmeta_lost']} "
              f"| {row['reference_caught']} | {row['reference_lost']} |")  # fmt: skip
    print(f"| **all rules** | {good['n']} good maps | | | {good['nvmeta']} | | {good['reference']} |")
    print(
        "\nr with the consensus (min / median / max): nvmeta (median of the others) | median of all, itself included"
    )
    for kind in ("good", "inverted", "outlier", "noise"):
        v = np.array(r_by_kind.get(kind, [np.nan]))
        w = np.array(r_self.get(kind, [np.nan]))
        print(f"  {kind:9s} {np.nanmin(v):+.3f} / {np.nanmedian(v):+.3f} / {np.nanmax(v):+.3f}  ({v.size} maps) | "
              f"{np.nanmin(w):+.3f} / {np.nanmedian(w):+.3f} / {np.nanmax(w):+.3f}")  # fmt: skip
    print(
        f"\nQC (build_qc) of the first selection ({n_maps // len(args.seeds)} maps), best of 3: "
        f"{seconds['off']:.1f} s without the consensus rules, {seconds['on']:.1f} s with them "
        f"(ratio {seconds['on'] / seconds['off']:.2f})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
