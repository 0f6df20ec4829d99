"""The worker pool of the per-image jobs (nvmeta.workflow.pool) and how the workflow uses it."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from helpers import SNAKEMAKE, SNAPSHOT, make_workdir, run_snakemake

from nvmeta.workflow.pool import WorkerDied, WorkerPool, run_in_worker

#: Seconds a test waits for a process or a file it expects; never reached when things work.
PATIENCE = 120


def _wait_for(predicate, what: str) -> None:
    deadline = time.monotonic() + PATIENCE
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.02)


def _alive(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie, ended but not reaped, counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


# Tasks (module level: workers import them by name).


def fail(message: str) -> None:
    raise ValueError(message)


def die(code: int) -> None:
    os._exit(code)


def meet(folder: str, me: str, other: str) -> int:
    """Say ``me`` is here and wait until ``other`` is too; return this process's id."""
    Path(folder, me).write_text(str(os.getpid()))
    _wait_for(lambda: Path(folder, other).exists(), f"task {other}")
    return os.getpid()


def die_when_met(folder: str) -> None:
    """Wait for the ``other`` task to be running beside this one, then die."""
    meet(folder, "dying", "survivor")
    os.kill(os.getpid(), signal.SIGKILL)


def outlive(folder: str) -> int:
    """Run beside ``die_when_met`` and return only once that worker is dead."""
    meet(folder, "survivor", "dying")
    pid = int(Path(folder, "dying").read_text())
    _wait_for(lambda: not _alive(pid), "the other worker's death")
    return os.getpid()


def test_tasks_run_in_a_worker_and_exceptions_come_back():
    pool = WorkerPool(2)
    try:
        pid = pool.run(os.getpid)
        assert pid != os.getpid()
        with pytest.raises(ValueError, match="broken header"):
            pool.run(fail, "broken header")
        assert pool.run(os.getpid) == pid  # the worker lives on after a failed task
        assert pool.run(sorted, [3, 1, 2], reverse=True) == [3, 2, 1]
        assert pool.started == 1
    finally:
        pool.close()
    _wait_for(lambda: not _alive(pid), "the worker to stop")


def test_tasks_run_side_by_side_one_worker_each(tmp_path):
    pool = WorkerPool(2)
    results: dict[str, int] = {}

    def job(me: str, other: str) -> None:
        results[me] = pool.run(meet, str(tmp_path), me, other)

    threads = [threading.Thread(target=job, args=pair) for pair in (("a", "b"), ("b", "a"))]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert set(results) == {"a", "b"} and results["a"] != results["b"]
        assert sorted(pool.pids()) == sorted(results.values())
    finally:
        pool.close()


def test_a_dead_worker_fails_only_its_own_task(tmp_path):
    """A worker killed mid-task fails that task alone, with how it died; the task running beside
    it in the other worker finishes, and the next task gets a new worker."""
    pool = WorkerPool(2)
    outcome: dict[str, object] = {}

    def job(name: str, fn) -> None:
        try:
            outcome[name] = pool.run(fn, str(tmp_path))
        except Exception as exc:  # noqa: BLE001 - recorded for the assertions
            outcome[name] = exc

    threads = [
        threading.Thread(target=job, args=("dying", die_when_met)),
        threading.Thread(target=job, args=("survivor", outlive)),
    ]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert isinstance(outcome["dying"], WorkerDied), outcome
        assert "killed by signal 9" in str(outcome["dying"])
        assert outcome["survivor"] == int((tmp_path / "survivor").read_text())
        dead = int((tmp_path / "dying").read_text())
        assert dead not in pool.pids()
        # two tasks side by side again: the survivor's worker and a new one
        again = tmp_path / "again"
        again.mkdir()
        pids: list[int] = []
        pair = [threading.Thread(target=lambda a, b: pids.append(pool.run(meet, str(again), a, b)), args=ab)
                for ab in (("a", "b"), ("b", "a"))]  # fmt: skip
        for t in pair:
            t.start()
        for t in pair:
            t.join()
        assert len(set(pids)) == 2 and dead not in pids and outcome["survivor"] in pids
        assert pool.started == 3
    finally:
        pool.close()


def test_a_task_that_exits_its_worker_is_reported():
    pool = WorkerPool(1)
    try:
        with pytest.raises(WorkerDied, match="exit code 3"):
            pool.run(die, 3)
        assert pool.run(sum, [1, 2]) == 3
    finally:
        pool.close()


def test_workers_are_replaced_after_max_tasks():
    pool = WorkerPool(1, max_tasks=3)
    try:
        pids = [pool.run(os.getpid) for _ in range(7)]
        assert [len(set(pids[i : i + 3])) for i in (0, 3, 6)] == [1, 1, 1]
        assert len(set(pids)) == 3 and pool.started == 3
        assert not _alive(pids[0]) and not _alive(pids[3])  # retired and reaped
    finally:
        pool.close()


def _signal_masks(pid: int) -> dict[str, int]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("SigBlk", "SigIgn"):
            fields[key] = int(value.strip(), 16)
    return fields


def test_workers_ignore_ctrl_c_quietly(capfd):
    """SIGINT is Snakemake's to handle: a worker ignores it (and never had it pending from its
    start-up), keeps serving and prints nothing."""
    pool = WorkerPool(1)
    try:
        pid = pool.run(os.getpid)
        masks = _signal_masks(pid)
        bit = 1 << (signal.SIGINT - 1)
        assert masks["SigIgn"] & bit and not masks["SigBlk"] & bit, masks
        os.kill(pid, signal.SIGINT)
        assert pool.run(os.getpid) == pid
    finally:
        pool.close()
    _wait_for(lambda: not _alive(pid), "the worker to stop")
    out, err = capfd.readouterr()
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err


def test_one_core_runs_inline():
    assert run_in_worker(os.getpid, workers=1) == os.getpid()


def test_workers_end_with_their_parent_however_it_ends(tmp_path):
    """A normal exit stops the workers; a parent killed outright leaves none behind either
    (each ends when it next reads its pipe)."""
    code = (
        "import os, sys\n"
        "from nvmeta.workflow.pool import shared_pool\n"
        "pool = shared_pool(2)\n"
        "print(pool.run(os.getpid), flush=True)\n"
        "if sys.argv[1] == 'kill':\n"
        "    os.kill(os.getpid(), 9)\n"
    )
    for how in ("exit", "kill"):
        proc = subprocess.run(
            [sys.executable, "-c", code, how], capture_output=True, text=True, timeout=PATIENCE
        )
        assert proc.returncode == (0 if how == "exit" else -9), proc.stderr
        assert proc.stderr == ""
        pid = int(proc.stdout)
        _wait_for(lambda pid=pid: not _alive(pid), f"the worker after the parent's {how}")


# The workflow's z-map jobs.


def _image_dir(tmp: Path, image_id: int) -> Path:
    """results/images/{id}/ as the download job leaves it, from the bundled snapshot."""
    record = json.loads((SNAPSHOT / "api" / "images" / f"{image_id}.json").read_text())
    d = tmp / "results" / "images" / str(image_id)
    d.mkdir(parents=True)
    src = SNAPSHOT / "media" / record["file"].split("/media/", 1)[1]
    (d / "map.nii.gz").write_bytes(src.read_bytes())
    (d / "metadata.json").write_text(json.dumps({**record, "nvmeta": {"status": "ok"}}))
    return d


def test_a_z_map_from_a_worker_equals_one_made_inline(tmp_path, monkeypatch):
    from nvmeta.images.template import load_mask
    from nvmeta.images.zmap import LIMIT_KEYS
    from nvmeta.workflow.config import defaults
    from nvmeta.workflow.jobs import zmap_task

    monkeypatch.chdir(tmp_path)
    nib.save(load_mask("mni152_2mm"), tmp_path / "mask.nii.gz")
    # 10426's record has no sample size
    conversion = {**defaults("conversion"), "df": "n-1", "n_images": {"10426": 20}}
    limits = {key: defaults("qc")[key] for key in LIMIT_KEYS}  # the rule's params
    out = {}
    for how, workers in (("inline", 1), ("worker", 2)):
        results = []
        for image_id in (990001, 10426):  # on the template's lattice, and interpolated from 3 mm
            d = tmp_path / how
            d.mkdir(exist_ok=True)
            rel = _image_dir(d, image_id).relative_to(tmp_path)
            outputs = (str(rel / "zmap.nii.gz"), str(rel / "qc.json"))
            qc = run_in_worker(
                zmap_task, str(tmp_path), str(image_id), str(rel / "metadata.json"), "mask.nii.gz",
                conversion, outputs, str(rel / "zmap.log"), limits, None, workers=workers,
            )  # fmt: skip
            assert qc["status"] == "included", qc
            assert json.loads(Path(outputs[1]).read_text()) == qc
            results.append((qc, np.asarray(nib.load(outputs[0]).dataobj)))
            assert "included" in (rel / "zmap.log").read_text()
        out[how] = results
    for (qc_a, z_a), (qc_b, z_b) in zip(out["inline"], out["worker"], strict=True):
        assert qc_a == qc_b
        np.testing.assert_array_equal(z_a, z_b)


def _marked_processes(marker: str) -> list[int]:
    """Live processes whose environment carries ``NVMETA_TEST_RUN=marker``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            env = Path(f"/proc/{entry}/environ").read_bytes()
        except OSError:
            continue
        if f"NVMETA_TEST_RUN={marker}".encode() in env.split(b"\0") and _alive(int(entry)):
            found.append(int(entry))
    return found


PAIN = list(range(990001, 990022))


@pytest.mark.e2e
def test_ctrl_c_during_z_maps_stops_the_workers_without_a_traceback(tmp_path):
    """SIGINT to the run's process group while z-maps run in workers: no traceback, no process
    left behind, the lock released; the same command then finishes every z-map."""
    cfg = {
        "neurovault": {"url": "tests/data/snapshot"},
        "conversion": {"df": "n-1"},
        "analyses": {"A": {"image_ids": PAIN, "meta": {"methods": ["stouffer"]}}},
    }
    wf = make_workdir(tmp_path, cfg, snapshot=SNAPSHOT)
    # (explicit targets: `--until` does not see the jobs that follow the query checkpoint)
    zmaps = [f"results/images/{i}/zmap.nii.gz" for i in PAIN]
    # (--cores first: --configfile takes several values and would swallow the targets)
    run_snakemake(wf, "--cores", "2", *[f"results/images/{i}/metadata.json" for i in PAIN])
    marker = f"{os.getpid()}-{time.monotonic_ns()}"
    env = dict(os.environ, PYTHONWARNINGS="ignore", NVMETA_TEST_RUN=marker)
    logs = wf / "results" / "logs" / "zmap"
    with open(tmp_path / "out.txt", "w") as out:
        proc = subprocess.Popen(
            [*SNAKEMAKE, "--cores", "2", *zmaps, "--configfile", "test.yaml"],
            cwd=wf,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # its own process group, as a terminal's foreground job
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        try:
            _wait_for(lambda: logs.is_dir() and len(list(logs.iterdir())) >= 3, "three z-map jobs")
            assert proc.poll() is None, "the run ended before the z-maps"
            # the Snakemake process and at least one worker running a z-map
            assert len(_marked_processes(marker)) >= 2
            os.killpg(proc.pid, signal.SIGINT)
            rc = proc.wait(timeout=PATIENCE)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    text = (tmp_path / "out.txt").read_text()
    assert rc != 0
    assert "Traceback" not in text and "KeyboardInterrupt" not in text, text[-3000:]
    _wait_for(lambda: not _marked_processes(marker), "every process of the run to end")
    assert not list((wf / ".snakemake" / "locks").glob("*"))
    assert len(list(logs.iterdir())) < len(PAIN), "the interrupt came after the last z-map"
    run_snakemake(wf, "--cores", "2", *zmaps)
    for image_id in PAIN:
        qc = json.loads((wf / f"results/images/{image_id}/qc.json").read_text())
        assert qc["status"] == "included", qc


@pytest.mark.e2e
def test_downloads_hold_a_connection_not_a_core(tmp_path):
    """With one core, z-maps run while later images download (a download waits on the network,
    it does not take the core); the server never sees more than max_connections at once."""
    from conftest import fast_config

    from nvmeta.testing.server import FixtureServer

    ids = PAIN[:8]
    with FixtureServer(SNAPSHOT, latency=0.3) as srv:
        cfg = {
            "neurovault": fast_config(srv.url, timeout=30.0),
            "conversion": {"df": "n-1"},
            "analyses": {"A": {"image_ids": ids}},
        }
        wf = make_workdir(tmp_path, cfg)
        run_snakemake(wf, "--cores", "2", "results/analyses/A/selection.tsv")
        proc = run_snakemake(wf, "--cores", "1", *[f"results/images/{i}/zmap.nii.gz" for i in ids])
        assert srv.max_in_flight <= 2
    running: dict[str, str] = {}
    overlapped = 0
    rule = None
    for line in proc.stdout.splitlines():
        line = line.strip()
        if m := re.fullmatch(r"(?:local)?rule (\w+):", line):
            rule = m.group(1)
        elif (m := re.fullmatch(r"jobid: (\d+)", line)) and rule is not None:
            running[m.group(1)] = rule
            overlapped += rule == "zmap" and "download" in running.values()
            rule = None
        elif m := re.fullmatch(r"Finished jobid: (\d+) \(Rule: \w+\)", line):
            running.pop(m.group(1), None)
    assert overlapped > 0, proc.stdout[-4000:]
    for image_id in ids:
        assert (wf / f"results/images/{image_id}/zmap.nii.gz").stat().st_size > 0
