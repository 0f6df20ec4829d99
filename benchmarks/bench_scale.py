"""One nvmeta run end to end at 1,000 and 5,000 distinct maps, downloads over HTTP with latency: time per map.

For each size N of ``--sizes``: a synthetic snapshot of N distinct maps (``synth_snapshot.py
--n-images N --pool N``, cached under ``--cache``: every map its own file, so QC drops no duplicate and
every fan-in reads N maps), served by :class:`nvmeta.testing.server.FixtureServer` with ``--latency``
seconds before every reply; a fresh copy of the workflow whose one analysis takes every collection
(``collection_ids``), ``meta: {methods: [stouffer, dersimonian_laird]}``, every other key at its
default (``neurovault.max_connections``: ``--connections``, default 2; the default figures and the
overview page). Then one ``python -m snakemake --cores C`` is timed from nothing: the query (every
collection listed over HTTP), N downloads, N z-maps (with Hedges' g for the DerSimonian-Laird job), QC
and the duplicate search, the two meta-analyses, the figures, the overview, Snakemake's start-up and
exit.

Printed per size: wall time, **time per map** (wall / N), the peak summed RSS of the process tree
(psutil, 50 ms), and where the time went per rule: jobs, summed job seconds and seconds per job, and
when the rule's first job started and its last ended (seconds from the run's first job; one-second
resolution, from Snakemake's output). Flat time per map from 1,000 to 5,000 means no cost grows faster
than the maps (the scheduler's included). The load average is printed before and after each run.

Usage::

    python benchmarks/bench_scale.py [--sizes 1000 5000] [--latency 0.1] [--connections 2] [--cores 2]
        [--cache DIR] [--workdir DIR]

Disk: ~0.93 MB of snapshot per map, and as much again for the downloads, plus z-maps and g/var(g)
maps (~13 GB at 5,000 maps, deleted at the end; the snapshot stays in the cache).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_vs_recipe import cached_snapshot, job_spans, run_measured, synth_config  # noqa: E402
from synth_snapshot import load_note, make_workdir, use_checkout  # noqa: E402


def rule_table(out: str) -> list[str]:
    """Per rule: jobs, summed seconds, seconds per job, first start and last end (s from the first job)."""
    spans = job_spans(out)
    if not spans:
        return []
    t0 = min(s for _, s, _ in spans)
    rows: dict[str, list] = defaultdict(lambda: [0, 0.0, None, None])
    for rule, s, e in spans:
        row = rows[rule]
        row[0] += 1
        row[1] += (e - s).total_seconds()
        start, end = (s - t0).total_seconds(), (e - t0).total_seconds()
        row[2] = start if row[2] is None else min(row[2], start)
        row[3] = end if row[3] is None else max(row[3], end)
    lines = [
        f"    {'rule':18s} {'jobs':>6s} {'job s':>8s} {'s/job':>7s} {'first start':>12s} {'last end':>9s}"
    ]
    for rule, (n, total, start, end) in sorted(rows.items(), key=lambda kv: kv[1][2]):
        if rule == "all":
            continue
        lines.append(f"    {rule:18s} {n:6d} {total:8.0f} {total / n:7.2f} {start:12.0f} {end:9.0f}")
    return lines


def one_size(n: int, args, tmp: Path) -> dict:
    from nvmeta.testing.server import FixtureServer

    snap, cids = cached_snapshot(args.cache, n)
    with FixtureServer(snap, latency=args.latency) as srv:
        cfg = synth_config(srv.url, cids, methods=("stouffer", "dersimonian_laird"))
        cfg["neurovault"]["max_connections"] = args.connections
        wf = make_workdir(tmp / f"wf{n}", cfg)
        cmd = [sys.executable, "-m", "snakemake", "--cores", str(args.cores), "--configfile", "bench.yaml"]
        before = load_note()
        secs, peak, _, out = run_measured(cmd, wf)
        after = load_note()
        requests, in_flight = len(srv.requests), srv.max_in_flight
    qc = (wf / "results" / "analyses" / "synth" / "qc.tsv").read_text().splitlines()[1:]
    included = sum("\tincluded\t" in f"\t{line}\t" for line in qc)
    print(
        f"[{n} maps] {secs:.1f} s end to end = **{secs / n * 1000:.1f} ms per map** ({included} included); "
        f"peak RSS {peak / 2**20:.0f} MB (tree); {requests} requests, at most {in_flight} at once; "
        f"latency {args.latency * 1000:.0f} ms, {args.connections} connections, --cores {args.cores}; "
        f"before: {before}; after: {after}",
        flush=True,
    )
    for line in rule_table(out):
        print(line)
    return {"n": n, "seconds": secs}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 5000])
    p.add_argument("--latency", type=float, default=0.1)
    p.add_argument("--connections", type=int, default=2)
    p.add_argument("--cores", type=int, default=2)
    p.add_argument(
        "--cache",
        type=Path,
        default=Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "nvmeta-bench",
        help="where the synthetic snapshots are generated once and reused",
    )
    p.add_argument("--workdir", type=Path, default=None, help="parent of the temporary workflow copies")
    p.add_argument(
        "--checkout", type=Path, default=None, help="benchmark the workflow and nvmeta of this tree"
    )
    args = p.parse_args()
    use_checkout(args.checkout)
    print(f"bench_scale: {' '.join(sys.argv[1:]) or '(defaults)'}; niceness {os.nice(0)}; {load_note()}")
    results = []
    for n in args.sizes:
        with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
            results.append(one_size(n, args, Path(tmp)))
    if len(results) > 1:
        base = results[0]["seconds"] / results[0]["n"]
        for r in results[1:]:
            per = r["seconds"] / r["n"]
            print(
                f"time per map at {r['n']} maps / at {results[0]['n']}: {per * 1000:.1f} / {base * 1000:.1f} ms "
                f"= **{per / base:.2f}**"
            )


if __name__ == "__main__":
    main()
