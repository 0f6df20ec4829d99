"""Per-image job cost: a fresh process per image (as Snakemake runs it) vs the bare in-process function call.

For each test map, runs side by side in this process:

- *subprocess*: ``python -c "import ...; make_zmap(...)"``: interpreter start, imports, template mask load,
  read, convert, resample, write (what one Snakemake per-image job costs, minus Snakemake's own overhead);
- *in-process*: ``make_zmap(...)`` with every module imported and the mask loaded already (the bare work).

Maps (from the bundled demo snapshot, ``tests/data/snapshot``): a real pain T map (91x109x91 LAS, 2 mm MNI: on the template lattice, no interpolation) and NeuroVault image
10426 (3 mm, 53x63x46: linear interpolation via nilearn). Template: ``mni152_2mm`` with the on-disk mask cache
warm (normal runs) and, for the pain map, off (``NVMETA_CACHE_DIR=""``: nilearn builds the mask in every job).

Usage: ``python benchmarks/bench_per_image.py [--repeat 5]``
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from nvmeta.workflow.config import defaults

SNAPSHOT = Path(__file__).resolve().parents[1] / "tests" / "data" / "snapshot"  # the bundled demo snapshot
MAPS = {
    "pain_01 (T, 2 mm lattice)": (
        SNAPSHOT / "media" / "images" / "1425" / "pain_01.nidm" / "TStatistic.nii.gz",
        {"map_type": "T map", "number_of_subjects": 25},
    ),
    "image_10426 (T, 3 mm linear)": (
        SNAPSHOT / "media" / "images" / "658" / "image_10426.nii.gz",
        {"map_type": "T map", "number_of_subjects": 20},
    ),
}

JOB = """
import sys
from nvmeta.images.template import load_mask
from nvmeta.images.zmap import make_zmap
from nvmeta.workflow.config import defaults
meta, src, out = sys.argv[1:4]
make_zmap(meta, src, load_mask("mni152_2mm"), {{**defaults("conversion"), "df": "n-2"}}, out + "/zmap.nii.gz",
          out + "/qc.json", defaults("qc"))
"""


def _write_meta(d: Path, fields: dict) -> Path:
    rec = {
        "id": 1,
        "collection_id": 1,
        "statistic_parameters": None,
        "nvmeta": {"status": "ok", "reason": None},
    }
    rec.update(fields)
    p = d / "metadata.json"
    p.write_text(json.dumps(rec))
    return p


def _children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def _subprocess_times(
    meta: Path, src: Path, out: Path, repeat: int, env: dict
) -> tuple[list[float], list[float]]:
    """Wall and CPU (user + sys) seconds of each subprocess run."""
    times, cpus = [], []
    for _ in range(repeat):
        c0 = _children_cpu()
        t0 = time.perf_counter()
        subprocess.run(
            [sys.executable, "-c", JOB.format(), str(meta), str(src), str(out)], check=True, env=env
        )
        times.append(time.perf_counter() - t0)
        cpus.append(_children_cpu() - c0)
    return times, cpus


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()

    from nvmeta.images.template import load_mask
    from nvmeta.images.zmap import make_zmap

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cache = tmp / "cache"
        env_warm = dict(os.environ, NVMETA_CACHE_DIR=str(cache))
        env_cold = dict(os.environ, NVMETA_CACHE_DIR="")
        os.environ["NVMETA_CACHE_DIR"] = str(cache)
        mask = load_mask("mni152_2mm")  # also warms the disk cache used by the subprocesses
        # a first subprocess run warms the OS file cache and the .pyc files
        first = next(iter(MAPS.values()))
        meta0 = _write_meta(tmp, first[1])
        _subprocess_times(meta0, first[0], tmp, 1, env_warm)

        print(
            f"python {sys.version.split()[0]}, repeat {args.repeat}, medians per image; load {os.getloadavg()[0]:.1f}"
        )
        print(
            f"{'map':30s} {'variant':26s} {'wall: subproc':>13s} {'in-proc':>8s} {'ratio':>6s}"
            f" {'cpu: subproc':>13s} {'in-proc':>8s} {'ratio':>6s}"
        )
        for label, (src, fields) in MAPS.items():
            d = tmp / label.split()[0]
            d.mkdir()
            meta = _write_meta(d, fields)
            make_zmap(
                meta,
                src,
                mask,
                {**defaults("conversion"), "df": "n-2"},
                d / "zmap.nii.gz",
                d / "qc.json",
                defaults("qc"),
            )  # warm-up (nilearn import)
            inproc, inproc_cpu = [], []
            for _ in range(args.repeat):
                c0 = time.process_time()
                t0 = time.perf_counter()
                qc = make_zmap(
                    meta,
                    src,
                    mask,
                    {**defaults("conversion"), "df": "n-2"},
                    d / "zmap.nii.gz",
                    d / "qc.json",
                    defaults("qc"),
                )
                inproc.append(time.perf_counter() - t0)
                inproc_cpu.append(time.process_time() - c0)
            assert qc["status"] == "included", qc
            t_in = statistics.median(inproc)
            c_in = statistics.median(inproc_cpu)
            variants = [("mask cache warm", env_warm)]
            if label.startswith("pain"):
                variants.append(("mask cache off", env_cold))
            for vname, env in variants:
                walls, cpus = _subprocess_times(meta, src, d, args.repeat, env)
                t_sub, c_sub = statistics.median(walls), statistics.median(cpus)
                print(
                    f"{label:30s} {vname + ' (' + qc['resample_method'] + ')':26s} "
                    f"{t_sub:12.3f}s {t_in:7.3f}s {t_sub / t_in:5.1f}x"
                    f" {c_sub:12.3f}s {c_in:7.3f}s {c_sub / c_in:5.1f}x"
                )
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"], check=True)
        print(f"(bare interpreter start: {time.perf_counter() - t0:.3f}s)")


if __name__ == "__main__":
    main()
