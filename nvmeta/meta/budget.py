"""Memory and wall time of the permutation test (:mod:`nvmeta.meta.permutation`).

How many maps it may hold in memory, how many permutations one pass over the maps accumulates,
the memory it needs (checked before it starts, and declared by the workflow's rule) and the wall
time its job declares. Nothing here imports the estimators, so the rules can read it at parse time.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

#: Maps (float64, no-data voxels as 0) are held in memory when they take at most this (285 maps
#: on the MNI152 2 mm mask); more maps are read again for every pass of permutations.
PERMUTATION_CACHE_BYTES = 512 << 20
#: Memory (bytes) of the permutations x voxels accumulator of the sign-flip test (float64) when
#: the maps are read again per pass (570 permutations per pass on the 2 mm mask) ...
PERMUTATION_ACC_BYTES = 1 << 30
#: ... and when they are in memory, where a pass costs no reading (35 permutations on 2 mm; a
#: larger accumulator would only cost page faults: about 5 s per fresh GiB on this project's VMs).
PERMUTATION_CACHED_ACC_BYTES = 64 << 20
#: Maps read per block (one float64 copy each) before they enter the accumulator.
PERMUTATION_BLOCK_UNITS = 64
#: Permutations whose maxima are taken at once (one float64 row per voxel each).
PERMUTATION_ROWS = 16
#: Seconds per map, permutation and voxel of the sign-flip test on 2 threads, reading included
#: (measured: 2,000 and 5,000 maps x 1,000 permutations on the 2 mm mask, 139 s and 335 s, i.e.
#: 2.95e-10 and 2.85e-10, rounded up; BENCHMARKS.md, "Fan-ins at 2,000 / 5,000 / 20,000 maps"). Maps held in
#: memory (at most 285 on 2 mm) cost about twice as much per map, which the 10 minutes every job
#: declares cover. :func:`permutation_runtime_minutes` declares 4 times it.
PERMUTATION_SECONDS_PER_UNIT_PERM_VOXEL = 3e-10


def available_memory_bytes() -> int:
    """Memory available to this process, in bytes.

    ``MemAvailable`` from ``/proc/meminfo`` (Linux), else physical pages × page size, capped
    by a cgroup v2 ``memory.max`` limit when one is set.
    """
    avail = None
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    if avail is None:
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            avail = 2**63 - 1
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
        if limit != "max":
            avail = min(avail, int(limit) - used)
    except (OSError, ValueError):
        pass
    return int(avail)


def maps_in_memory(n_units: int, n_vox: int) -> bool:
    """Whether the permutation method holds the maps in memory (:data:`PERMUTATION_CACHE_BYTES`)."""
    return 8 * int(n_units) * int(n_vox) <= PERMUTATION_CACHE_BYTES


def permutations_per_pass(n_units: int, n_vox: int) -> int:
    """How many permutations one pass accumulates (:data:`PERMUTATION_ACC_BYTES`, or
    :data:`PERMUTATION_CACHED_ACC_BYTES` when the maps are in memory)."""
    acc = PERMUTATION_CACHED_ACC_BYTES if maps_in_memory(n_units, n_vox) else PERMUTATION_ACC_BYTES
    return max(1, acc // (8 * max(1, int(n_vox))))


def permutation_memory_bytes(n_units: int, n_vox: int, n_perm: int | None = None) -> int:
    """Estimated peak memory (bytes) of the permutation method, beyond the interpreter's own.

    The permutations × voxels accumulator (float64, :func:`permutations_per_pass` rows;
    ``n_perm=None`` assumes it full), the working copy of :data:`PERMUTATION_ROWS` of its rows, the
    signs of one pass (int8 and float64), the running sums and a map being read; and either the
    maps in memory, twice while they are restricted to the complete voxels (at most
    :data:`PERMUTATION_CACHE_BYTES`), or one block of :data:`PERMUTATION_BLOCK_UNITS` maps.
    ``tests/test_meta.py`` checks it against tracemalloc's peak. Beyond the cache, it does not
    grow with the number of maps but for the signs (9 bytes per map and permutation of a pass).
    """
    n_units, n_vox = int(n_units), int(n_vox)
    per_pass = permutations_per_pass(n_units, n_vox)
    p = per_pass if n_perm is None else min(int(n_perm), per_pass)
    rows = min(PERMUTATION_ROWS, p)
    if maps_in_memory(n_units, n_vox):
        maps = 2 * 8 * n_units * n_vox
    else:
        maps = 8 * min(PERMUTATION_BLOCK_UNITS, max(1, n_units)) * (n_vox + p)
    # running sums (5 vectors) and a map being read (its template-grid volume, ~4x the mask, decoded)
    return 8 * (p + rows) * n_vox + maps + 9 * p * n_units + 24 * 8 * n_vox


def permutation_runtime_minutes(n_units: int, n_vox: int, n_perm: int) -> int:
    """Wall time (minutes) the permutation job declares: 10 minutes plus 4 times the measured
    :data:`PERMUTATION_SECONDS_PER_UNIT_PERM_VOXEL` rate.

    The test reads every map once per pass and multiplies ``n_perm`` sign vectors by the maps at
    every voxel, so its time is proportional to maps x permutations x voxels (2,000 and 5,000 maps
    cost the same per map). The factor 4 leaves room for a slower or shared node; a job that
    declared too little would be killed by SLURM at its limit.
    """
    work = int(n_units) * int(n_perm) * int(n_vox)
    return 10 + math.ceil(4 * PERMUTATION_SECONDS_PER_UNIT_PERM_VOXEL * work / 60)
