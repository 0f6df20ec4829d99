"""nvmeta at ``--cores 2`` against ``--cores 1``: everything after the downloads, and the z-maps alone.

Does the per-image work use every core it is given? On a synthetic snapshot of ``--n-images``
distinct maps (``synth_snapshot.py --n-images 400 --pool 400``, cached under ``--cache``; one analysis
over all its collections, ``meta: {methods: [stouffer]}``, as ``bench_vs_recipe.py --part synth``),
after one untimed run that downloads everything:

- **after-downloads**: every output but the downloads and the query's selection is deleted
  (``bench_vs_recipe.clean_outputs``), then ``python -m snakemake --cores C`` is timed: template
  mask, z-maps, QC, the Stouffer job, the input figures, the overview, Snakemake's start-up and
  exit;
- **zmap**: ``python -m snakemake --cores C --forcerun zmap --until zmap``: the z-map jobs alone.

``C`` alternates between the values of ``--cores`` (default 1 and 2) within each repeat. Loads:

- **idle**: nothing of the benchmark's own beside the run (the machine's load average is printed
  with every figure: on a shared machine other users' work is there too);
- **nice**: one CPU-bound process (``while True: pass``) per core, started at this process's
  niceness + 10 (at most 19; the niceness of both is printed), for the duration of each run.

The figure is the ratio of the medians, ``--cores 1`` over ``--cores 2``: 2.0 means both cores did
the work. Each run also reports the CPU seconds of the Snakemake process itself (all its threads:
the scheduler, the job threads, the jobs that run in it) and of its children (the z-map workers,
the script jobs), from ``getrusage`` at its exit. ``--checkout DIR`` measures another tree's workflow and ``nvmeta`` (an export of an older
commit: ``git archive COMMIT | tar -x -C DIR``), for a before/after table from one machine.

Usage::

    python benchmarks/bench_cores.py [--n-images 400] [--repeat 2] [--load idle nice]
        [--what after-downloads zmap] [--cores 1 2] [--cache DIR] [--checkout DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_vs_recipe import cached_snapshot, clean_outputs, per_rule_times, synth_config  # noqa: E402
from synth_snapshot import load_note, make_workdir, use_checkout  # noqa: E402

BURN = "while True:\n    pass\n"

# `python -m snakemake`, plus the CPU seconds of the Snakemake process itself (all its threads: the
# scheduler, the job threads, in-process jobs) and of its children (workers, script jobs), at exit.
SNAKEMAKE_WITH_RUSAGE = (
    "import atexit, json, resource, sys\n"
    "def _report(path=sys.argv.pop(1)):\n"
    "    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)\n"
    "    json.dump({'snakemake': own.ru_utime + own.ru_stime, 'children': kids.ru_utime + kids.ru_stime},\n"
    "              open(path, 'w'))\n"
    "atexit.register(_report)\n"
    "from snakemake.cli import main\n"
    "sys.argv[0] = 'snakemake'\n"
    "main()\n"
)


class Burners:
    """One CPU-bound Python process per core at this process's niceness + 10 (context manager)."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.procs: list[subprocess.Popen] = []

    def __enter__(self) -> Burners:
        self.procs = [
            subprocess.Popen([sys.executable, "-c", BURN], preexec_fn=lambda: os.nice(10))
            for _ in range(self.n)
        ]
        time.sleep(0.5)  # let them start
        return self

    def niceness(self) -> int:
        return os.getpriority(os.PRIO_PROCESS, self.procs[0].pid)

    def __exit__(self, *exc) -> None:
        for p in self.procs:
            p.kill()
        for p in self.procs:
            p.wait()


def timed_run(wf: Path, cores: int, what: str) -> tuple[float, str, dict]:
    """One timed snakemake run (``what="first"``: the untimed one that downloads); (wall s, output,
    CPU seconds of the Snakemake process and of its children)."""
    extra: list[str] = []
    if what == "after-downloads":
        clean_outputs(wf)
    elif what == "first":
        pass
    else:
        extra = ["--forcerun", "zmap", "--until", "zmap"]
    # the config file last: --configfile takes several values and would swallow other arguments
    usage = wf / "rusage.json"
    cmd = [sys.executable, "-c", SNAKEMAKE_WITH_RUSAGE, str(usage), "--cores", str(cores), *extra]
    cmd += ["--configfile", "bench.yaml"]
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=wf, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    secs = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stdout[-5000:]}")
    return secs, proc.stdout, json.loads(usage.read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-images", type=int, default=400)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--load", nargs="+", choices=["idle", "nice"], default=["idle", "nice"])
    p.add_argument(
        "--what", nargs="+", choices=["after-downloads", "zmap"], default=["after-downloads", "zmap"]
    )
    p.add_argument("--cores", nargs="+", type=int, default=[1, 2])
    p.add_argument(
        "--cache",
        type=Path,
        default=Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "nvmeta-bench",
        help="where the synthetic snapshot is generated once and reused",
    )
    p.add_argument("--workdir", type=Path, default=None, help="parent of the temporary workflow copy")
    p.add_argument(
        "--checkout", type=Path, default=None, help="benchmark the workflow and nvmeta of this tree"
    )
    args = p.parse_args()
    use_checkout(args.checkout)
    code = f"checkout {args.checkout}" if args.checkout else "this checkout"
    print(
        f"bench_cores: {' '.join(sys.argv[1:]) or '(defaults)'}; {code}; niceness {os.nice(0)}; {load_note()}"
    )
    snap, cids = cached_snapshot(args.cache, args.n_images)
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        wf = make_workdir(Path(tmp) / "wf", synth_config(str(snap), cids))
        t_first, _, _ = timed_run(wf, 2, "first")
        print(f"first run (downloads included): {t_first:.1f} s; {load_note()}", flush=True)
        times: dict[tuple[str, str, int], list[float]] = {}
        for load in args.load:
            for r in range(args.repeat):
                order = args.cores if r % 2 == 0 else list(reversed(args.cores))
                for what in args.what:
                    for cores in order:
                        burners = Burners(os.cpu_count() or 1) if load == "nice" else None
                        if burners is not None:
                            burners.__enter__()
                        try:
                            before = load_note()
                            secs, out, cpu = timed_run(wf, cores, what)
                            extra = f", burners at niceness {burners.niceness()}" if burners else ""
                        finally:
                            if burners is not None:
                                burners.__exit__()
                        times.setdefault((load, what, cores), []).append(secs)
                        rules = per_rule_times(out)
                        top = ", ".join(
                            f"{rule} {n}x {s:.0f} s"
                            for rule, (n, s) in sorted(rules.items(), key=lambda kv: -kv[1][1])
                        )
                        print(
                            f"  {load:4s} {what:15s} --cores {cores}: {secs:6.1f} s, CPU s: Snakemake process "
                            f"{cpu['snakemake']:.1f}, its children {cpu['children']:.1f}  (run {r + 1}; before: {before}; "
                            f"after: {load_note()}{extra}) [{top}]",
                            flush=True,
                        )
        print(f"\nsummary ({args.n_images} maps; medians; {code}; {load_note()}):")
        lo, hi = min(args.cores), max(args.cores)
        for load in args.load:
            for what in args.what:
                med = {c: statistics.median(times[(load, what, c)]) for c in args.cores}
                runs = "; ".join(
                    f"--cores {c}: " + ", ".join(f"{t:.1f}" for t in times[(load, what, c)])
                    for c in args.cores
                )
                print(
                    f"  {load:4s} {what:15s} --cores {lo} {med[lo]:.1f} s, --cores {hi} {med[hi]:.1f} s: "
                    f"speed-up **{med[lo] / med[hi]:.2f}x**  ({runs})"
                )


if __name__ == "__main__":
    main()
