"""Downloads overlap the z-maps: total wall time against download alone and compute alone.

A synthetic snapshot of ``--n-images`` distinct maps (``synth_snapshot.py --n-images 400 --pool
400``, cached under ``--cache``) served by :class:`nvmeta.testing.server.FixtureServer` with
``--latency`` seconds before every reply (default 0.2), ``neurovault.max_connections``
``--connections`` (default 2: at most two requests at once, checked on the server); one analysis
over every collection, ``meta: {methods: [stouffer]}`` (as ``bench_vs_recipe.py --part synth``),
``snakemake --cores C`` (default 2). The query runs first and untimed in each workflow copy (the
same selection for all three runs). Then, alternating the order between repeats:

- **download alone**: copy A, the ``results/images/{id}/metadata.json`` of every selected image as
  targets (the downloads and nothing else);
- **compute alone**: copy A again, now with every map on disk: the default target (template, z-maps,
  QC, the Stouffer job, the figures, the overview);
- **together**: copy B, the default target from the query's selection: downloads and everything
  after them in one run.

The figure is **together / max(download alone, compute alone)**: 1.0 is full overlap (the run takes
as long as its slower half), 2.0 none at all (one after the other, as when every download had to
finish before the first z-map). Snakemake's start-up is in each of the three.

Usage::

    python benchmarks/bench_overlap.py [--n-images 400] [--latency 0.2] [--connections 2] [--cores 2]
        [--repeat 1] [--cache DIR] [--checkout DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_vs_recipe import cached_snapshot, run_measured, synth_config  # noqa: E402
from synth_snapshot import load_note, make_workdir, use_checkout  # noqa: E402


def _snakemake(wf: Path, cores: int, *targets: str) -> tuple[float, str]:
    # targets before the config file: --configfile takes several values and would swallow them
    cmd = [sys.executable, "-m", "snakemake", "--cores", str(cores), *targets, "--configfile", "bench.yaml"]
    secs, _, _, out = run_measured(cmd, wf)
    return secs, out


def _prepared(tmp: Path, name: str, cfg: dict, cores: int) -> tuple[Path, list[str]]:
    """A workflow copy whose query has run; the metadata.json targets of its selection."""
    wf = make_workdir(tmp / name, cfg)
    _snakemake(wf, cores, "results/analyses/synth/selection.tsv")
    ids = [
        line.split("\t", 1)[0]
        for line in (wf / "results/analyses/synth/selection.tsv").read_text().splitlines()[1:]
    ]
    return wf, [f"results/images/{i}/metadata.json" for i in ids]


def main() -> None:
    from nvmeta.testing.server import FixtureServer

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-images", type=int, default=400)
    p.add_argument("--latency", type=float, default=0.2)
    p.add_argument("--connections", type=int, default=2)
    p.add_argument("--cores", type=int, default=2)
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument(
        "--cache",
        type=Path,
        default=Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "nvmeta-bench",
        help="where the synthetic snapshot is generated once and reused",
    )
    p.add_argument("--workdir", type=Path, default=None, help="parent of the temporary workflow copies")
    p.add_argument(
        "--checkout", type=Path, default=None, help="benchmark the workflow and nvmeta of this tree"
    )
    args = p.parse_args()
    use_checkout(args.checkout)
    print(f"bench_overlap: {' '.join(sys.argv[1:]) or '(defaults)'}; niceness {os.nice(0)}; {load_note()}")
    snap, cids = cached_snapshot(args.cache, args.n_images)
    res: dict[str, list[float]] = {"download": [], "compute": [], "together": []}
    with (
        tempfile.TemporaryDirectory(dir=args.workdir) as tmp,
        FixtureServer(snap, latency=args.latency) as srv,
    ):
        tmp = Path(tmp)
        cfg = synth_config(srv.url, cids)
        cfg["neurovault"]["max_connections"] = args.connections
        for r in range(args.repeat):
            order = ["separate", "together"] if r % 2 == 0 else ["together", "separate"]
            for which in order:
                if which == "separate":
                    wf, targets = _prepared(tmp, f"a{r}", cfg, args.cores)
                    srv.reset_log()
                    t_dl, _ = _snakemake(wf, args.cores, *targets)
                    in_flight = srv.max_in_flight
                    t_c, _ = _snakemake(wf, args.cores)
                    res["download"].append(t_dl)
                    res["compute"].append(t_c)
                    print(
                        f"  run {r + 1}: download alone {t_dl:.1f} s ({len(targets)} images, at most {in_flight} "
                        f"requests at once), compute alone {t_c:.1f} s; {load_note()}",
                        flush=True,
                    )
                else:
                    wf, targets = _prepared(tmp, f"b{r}", cfg, args.cores)
                    srv.reset_log()
                    t_all, _ = _snakemake(wf, args.cores)
                    in_flight = srv.max_in_flight
                    res["together"].append(t_all)
                    qc = wf / "results/analyses/synth/qc.tsv"
                    ok = sum(json.loads((wf / t).read_text())["nvmeta"]["status"] == "ok" for t in targets)
                    print(
                        f"  run {r + 1}: together {t_all:.1f} s ({ok}/{len(targets)} downloaded, at most {in_flight} "
                        f"requests at once, qc.tsv {'written' if qc.is_file() else 'MISSING'}); {load_note()}",
                        flush=True,
                    )
    med = {k: statistics.median(v) for k, v in res.items()}
    slower = max(med["download"], med["compute"])
    print(
        f"{args.n_images} maps, {args.latency * 1000:.0f} ms latency, {args.connections} connections, --cores "
        f"{args.cores}: download alone {med['download']:.1f} s, compute alone {med['compute']:.1f} s, together "
        f"{med['together']:.1f} s = **{med['together'] / slower:.2f}x** the slower half "
        f"(sum would be {(med['download'] + med['compute']) / slower:.2f}x); {load_note()}"
    )


if __name__ == "__main__":
    main()
