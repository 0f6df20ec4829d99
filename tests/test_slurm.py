"""SLURM, for real: a small demo run through snakemake-executor-plugin-slurm on a single-node
cluster started by the test (Debian's slurm-wlm + munge, installed when missing; see
tests/slurm_cluster.py), checked job by job against SLURM's own records, and output by output
against a local run of the same config. The z-map jobs go in batches (a Snakemake group per batch,
joined by the batch's table job, rule zmap_batch): N of them must reach SLURM as exactly
ceil(N / size) submissions, each z-map run once, in a fresh run; in a rerun, one submission per
batch with z-maps to redo, holding only those.

Needs root (to install the packages and start the daemons); skipped, with the reason, only where
the packages cannot be installed.
"""

from __future__ import annotations

import collections
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from helpers import REPO, SNAKEMAKE, SNAPSHOT, compared_files, make_workdir
from slurm_cluster import DAEMONS, DEFAULT_CONF, SlurmCluster, ensure_installed

DEMO = yaml.safe_load((REPO / "config" / "demo.yaml").read_text())
# The z-map jobs go in batches of BATCH (config key cluster.zmap_batch_size).
BATCH = 4
# The demo, reduced so that the cluster run takes a minute or two: the `edge` analysis (failed
# downloads, an Analyze pair, a 5-D file, duplicates) and four of the pain maps with two methods
# (so that meta_sensitivity runs too).
CONFIG = {
    **{key: value for key, value in DEMO.items() if key != "analyses"},
    # no task atlas: its selection would add its own images to every stage
    "atlas": None,
    "cluster": {"zmap_batch_size": BATCH},
    "analyses": {
        "edge": DEMO["analyses"]["edge"],
        "pain": {
            "image_ids": [990001, 990002, 990003, 990004],
            "meta": {"methods": ["stouffer", "fisher"]},
        },
    },
}
IMAGE_IDS = sorted({*CONFIG["analyses"]["pain"]["image_ids"], *DEMO["analyses"]["edge"]["image_ids"]})
# Rules the workflow runs on the submit host (downloads and the query), never through sbatch.
LOCAL_RULES = {"download", "query"}
# The rules that do the work; each of their jobs must go through sbatch.
CLUSTER_RULES = {"zmap", "qc", "qc_figure", "meta", "meta_sensitivity", "input_figures", "methods"}
# Their jobs for CONFIG: 10 images, 2 analyses, 3 (analysis, method) pairs, 1 analysis with 2 methods.
EXPECTED_CLUSTER_JOBS = collections.Counter(
    {"zmap": 10, "qc": 2, "qc_figure": 2, "meta": 3, "meta_sensitivity": 1, "input_figures": 2, "methods": 2}
)
TEST_PROFILE = yaml.safe_load((REPO / "profiles/slurm-test/config.yaml").read_text())
# The batches, by hand: the selected ids in ascending order, BATCH at a time (the last one the rest).
BATCHES = [sorted(IMAGE_IDS)[start : start + BATCH] for start in range(0, len(IMAGE_IDS), BATCH)]
# Minutes of wall time per z-map (set-resources); a batch asks the sum.
ZMAP_MINUTES = 3
# profiles/slurm-test differs from profiles/slurm only in these keys.
TEST_ONLY_KEYS = {
    "jobs",
    "latency-wait",
    "slurm-init-seconds-before-status-checks",
    "slurm-status-command",
    "slurm-keep-successful-logs",
    "default-resources",
}
RUN_TIMEOUT = 600
# Extra snakemake arguments for both runs (debugging aid, e.g. ["--omit-from", "input_figures"]).
EXTRA_ARGS: list[str] = []


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    """The reduced demo run locally: the reference the cluster run must reproduce.

    Started in the background, so that it overlaps the cluster run (which mostly waits for job
    states); :func:`finish_local_run` waits for it."""
    wf = make_workdir(tmp_path_factory.mktemp("local"), CONFIG, snapshot=SNAPSHOT)
    cmd = [*SNAKEMAKE, "--cores", "2", "--configfile", "test.yaml", *EXTRA_ARGS]
    log = open(wf / "local_run.log", "w")  # noqa: SIM115 (closed when the run is waited for)
    proc = subprocess.Popen(
        cmd, cwd=wf, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONWARNINGS="ignore")
    )
    try:
        yield wf, proc, log
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()


def finish_local_run(local_run) -> Path:
    wf, proc, log = local_run
    code = proc.wait(timeout=RUN_TIMEOUT)
    log.flush()
    text = (wf / "local_run.log").read_text(errors="replace")
    assert code == 0, f"the local reference run failed ({code}):\n{text[-6000:]}"
    return wf


@pytest.fixture(scope="module")
def cluster():
    """A running single-node SLURM cluster; after the module, checks that nothing of it is left."""
    if os.geteuid() != 0:
        pytest.skip(
            "the SLURM test needs root: it installs slurm-wlm/munge and starts slurmctld, slurmd, munged"
        )
    reason = ensure_installed()
    if reason is not None:
        pytest.skip(f"SLURM cannot be installed on this machine: {reason}")
    stepds_before = {pid for pid, comm in _processes() if comm == "slurmstepd"}
    c = SlurmCluster(cpus=8, keep=False)
    c.start()
    started = {name: proc.pid for name, proc in c.procs.items()}
    base = c.base
    try:
        yield c
    finally:
        c.stop()
    for name, pid in started.items():
        assert not Path(f"/proc/{pid}").exists() or _zombie(pid), f"{name} (pid {pid}) still running"
    leftovers = [
        f"{pid} {comm}"
        for pid, comm in _processes()
        if not _zombie(pid)
        and (
            (comm in DAEMONS and str(base) in _cmdline(pid))
            or (comm == "slurmstepd" and pid not in stepds_before)
        )
    ]
    assert not leftovers, f"processes left by the test cluster: {leftovers}"
    assert not DEFAULT_CONF.is_symlink(), f"{DEFAULT_CONF} link left behind"
    assert not base.exists()


def _processes():
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                yield int(entry.name), (entry / "comm").read_text().strip()
            except OSError:
                continue


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def run_on_cluster(
    wf: Path, cluster: SlurmCluster, *args: str, log_name: str = "slurm_run.log"
) -> tuple[int, str, float]:
    """Run the workflow with the SLURM test profile (its output in ``wf/log_name``); kill its
    process group if it hangs."""
    cmd = [
        *SNAKEMAKE,
        "--workflow-profile",
        "profiles/slurm-test",
        "--configfile",
        "test.yaml",
        *EXTRA_ARGS,
        *args,
    ]
    env = cluster.env(dict(os.environ, PYTHONWARNINGS="ignore"))
    log = wf / log_name
    start = time.monotonic()
    with open(log, "w") as fh:
        proc = subprocess.Popen(
            cmd, cwd=wf, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        try:
            code = proc.wait(timeout=RUN_TIMEOUT)
        except subprocess.TimeoutExpired:
            # the plugin does not always stop on SIGTERM while it waits for job states
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            code = None
    elapsed = time.monotonic() - start
    text = log.read_text(errors="replace")
    if code is None:
        raise AssertionError(
            f"snakemake on SLURM did not finish within {RUN_TIMEOUT}s:\n{text[-6000:]}\n"
            f"squeue: {cluster.jobs()}\n{cluster.logs()}"
        )
    return code, text, elapsed


@pytest.fixture(scope="module")
def slurm_run(tmp_path_factory, local_run, cluster):
    wf = make_workdir(tmp_path_factory.mktemp("slurm"), CONFIG, snapshot=SNAPSHOT)
    code, text, elapsed = run_on_cluster(wf, cluster)
    print(f"snakemake on SLURM: {elapsed:.1f} s")
    assert code == 0, f"snakemake on SLURM failed ({code}):\n{text[-8000:]}\n{cluster.logs()}"
    # SLURM's records, read while the cluster runs (finished jobs stay listed for MinJobAge).
    return {
        "wf": wf,
        "log": text,
        "squeue": cluster.jobs(),
        "jobcomp": cluster.completed_jobs(),
        "submitted": cluster.submissions(),
        "elapsed": elapsed,
    }


def main_log(log: str) -> str:
    """Snakemake's own output without the job logs it prints after a failure (show-failed-logs):
    those hold the job's inner Snakemake output, with job headers of their own."""
    out = []
    lines = iter(log.splitlines())
    for line in lines:
        if line.startswith("Logfile ") and line.endswith(":"):
            fence = next(lines, "")
            if fence and set(fence) == {"="}:
                for inner in lines:
                    if inner == fence:
                        break
                continue
            out.append(line)
            line = fence
        out.append(line)
    return "\n".join(out)


def snakemake_jobs(log: str) -> tuple[collections.Counter, collections.Counter]:
    """Jobs Snakemake started, per rule: (non-local, local), from its job headers (a group job's
    members are indented under their group's header, see :func:`group_jobs`)."""
    log = main_log(log)
    remote = collections.Counter(re.findall(r"^(?:rule|checkpoint) (\S+):$", log, flags=re.M))
    local = collections.Counter(re.findall(r"^local(?:rule|checkpoint) (\S+):$", log, flags=re.M))
    return remote, local


def group_jobs(log: str) -> list[tuple[str, list[tuple[str, str]]]]:
    """Group jobs Snakemake started: (group, [(rule, wildcards), ...]) from each "Group job" header
    and the indented job headers under it.

    Only group members are printed indented (``    rule zmap:``); other threads' lines (the
    plugin's "No SLURM account given ...") can land between a header and its members, so a
    non-indented line does not end the listing: the next header does."""
    groups = []
    members = None
    rule = None
    for line in main_log(log).splitlines():
        header = re.match(r"^\[.*\] Group job (\S+) \(jobs in lexicogr\. order\):$", line)
        if header:
            members = []
            groups.append((header.group(1), members))
            continue
        if members is None:
            continue
        if m := re.match(r"^    (?:local)?rule (\S+):$", line):
            rule = m.group(1)
        elif m := re.match(r"^        wildcards: (.*)$", line):
            members.append((rule, m.group(1)))
    return groups


def plugin_submissions(log: str) -> dict[str, tuple[str, str]]:
    """SLURM job id -> (Snakemake job id, plugin log path), from the plugin's "submitted" lines
    (a group job's id is a UUID)."""
    found = re.findall(
        r"^Job (\S+) has been submitted with SLURM jobid (\d+) \(log: (.+)\)\.$", main_log(log), flags=re.M
    )
    return {slurm_id: (job_id, path) for job_id, slurm_id, path in found}


def executed_in(job_log: str) -> list[tuple[str, str]]:
    """(rule, wildcards) of every job that ran inside one SLURM job, from its log: the job-step
    executor starts one nested Snakemake per job with srun, which reports it as a local rule; the
    job-step executor's own count of steps done closes the log."""
    found = re.findall(r"^localrule (\S+):\n(?:    .*\n)*?    wildcards: (.*)$", job_log, flags=re.M)
    assert f"{len(found)} of {len(found)} steps (100%) done" in job_log, job_log[-3000:]
    return found


def expected_batches(zmap_ids: list[int]) -> dict[str, list[str]]:
    """Group id -> the jobs of the group jobs a run submits when the z-maps of ``zmap_ids`` have to
    run: per batch of BATCHES holding any of them, those z-maps and the batch's table job."""
    out = {}
    for k, batch in enumerate(BATCHES):
        redo = [i for i in batch if i in zmap_ids]
        if redo:
            out[f"zmaps_{k}"] = sorted([*(f"zmap image_id={i}" for i in redo), f"zmap_batch batch={k}"])
    return out


def check_submissions(run: dict, expected: collections.Counter, zmap_ids: list[int]) -> dict:
    """Every non-local job of ``run`` went through sbatch, the z-maps in batches: one submission
    per batch holding z-maps to run (ceil(N / BATCH) for all N), each z-map run exactly once.
    Checked in Snakemake's log, SLURM's records (squeue, slurmctld's log, the job-completion log)
    and each SLURM job's own log.

    Returns SLURM job id -> the (rule, wildcards) that ran in it."""
    log = run["log"]
    remote, local = snakemake_jobs(log)
    assert not set(local) & CLUSTER_RULES, local
    assert not set(remote) & LOCAL_RULES, remote
    # Snakemake: the z-map jobs only inside group jobs zmaps_<k>, each with its batch's table job
    batches = expected_batches(zmap_ids)
    groups = {name: sorted(f"{rule} {wc}" for rule, wc in jobs) for name, jobs in group_jobs(log)}
    assert len(groups) == len(group_jobs(log)), "a group job was started twice"
    assert groups == batches, groups
    assert not {"zmap", "zmap_batch"} & set(remote), remote
    assert remote + collections.Counter(zmap=len(zmap_ids)) == expected, remote

    run_id = re.search(r"^SLURM run ID: (\S+)$", log, flags=re.M).group(1)
    submitted = plugin_submissions(log)
    # the plugin: one submission per non-local job, one per batch
    assert len(submitted) == sum(remote.values()) + len(batches), submitted

    # squeue (the controller's record): one job per submission, named with the run id, its comment
    # naming the rule (rule_zmaps_<k>_...: a batch, the group's id), all COMPLETED, in the test partition
    ours = [job for job in run["squeue"] if job["name"] == run_id]
    assert {job["jobid"] for job in ours} == set(submitted)
    assert all(job["state"] == "COMPLETED" and job["partition"] == "debug" for job in ours), ours
    rules = {}
    for job in ours:
        group = re.match(r"rule_(zmaps_\d+)_", job["comment"])
        rules[job["jobid"]] = (
            group.group(1) if group else re.match(r"rule_(.+?)(_wildcards_.*)?$", job["comment"]).group(1)
        )
    assert collections.Counter(rules.values()) == remote + collections.Counter(batches.keys())
    # slurmctld's log: each arrived as an sbatch submission (_slurm_rpc_submit_batch_job); that the
    # run made no other one is the squeue check above (every job named with the run id is one of these)
    assert set(submitted) <= set(run["submitted"])
    # the job-completion log (independent of squeue): each finished with exit code 0 on the node
    done = {row["JobId"]: row for row in run["jobcomp"] if row.get("Name") == run_id}
    assert set(done) == set(submitted)
    assert all(row["JobState"] == "COMPLETED" and row["ExitCode"] == "0:0" for row in done.values())
    assert all(row["NodeList"] == "localhost" for row in done.values())

    # each SLURM job's own log (kept by the test profile): what ran inside that allocation
    ran = {
        slurm_id: executed_in(Path(path).read_text(errors="replace"))
        for slurm_id, (_, path) in submitted.items()
    }
    for slurm_id, jobs in ran.items():
        assert "--executor slurm-jobstep" in Path(submitted[slurm_id][1]).read_text(errors="replace")
        if rules[slurm_id] in batches:
            assert sorted(f"{rule} {wc}" for rule, wc in jobs) == batches[rules[slurm_id]], jobs
        else:
            assert len(jobs) == 1 and jobs[0][0] == rules[slurm_id], jobs
    # no job ran twice: every z-map in exactly one batch, once
    zmaps_run = [wc for jobs in ran.values() for rule, wc in jobs if rule == "zmap"]
    assert sorted(zmaps_run) == sorted(f"image_id={i}" for i in zmap_ids), zmaps_run
    all_run = [job for jobs in ran.values() for job in jobs]
    assert len(all_run) == len(set(all_run)), all_run

    # resources that reached sbatch (--mem, --time, --cpus-per-task) at attempt 1: the profile's
    # set-resources; a batch asks one z-map's memory and CPU (its z-maps run one at a time) and the
    # sum of their wall times plus the table job's minute
    memory = {"meta": "2000M", "meta_sensitivity": "1000M", "input_figures": "2000M", "qc_figure": "1000M"}
    memory["methods"] = "1000M"  # the profile's default-resources
    # the rule's own: 1000 + 2 per map (duplicate search) + 1 per map (consensus), few maps
    qc_memory = {"edge": "1018M", "pain": "1012M"}
    for job in ours:
        rule = rules[job["jobid"]]
        if rule in batches:
            expected_mem, minutes = "1500M", ZMAP_MINUTES * (len(ran[job["jobid"]]) - 1) + 1
        else:
            expected_mem = qc_memory[job["comment"].rsplit("_", 1)[1]] if rule == "qc" else memory[rule]
            # the profile's set-resources, or its default-resources' runtime=15
            minutes = 10 if rule in TEST_PROFILE["set-resources"] or rule == "meta" else 15
        assert job["memory"] == expected_mem, job
        assert job["time_limit"] == f"{minutes}:00", job
        assert job["cpus"] == "1", job
    return ran


# ---------------------------------------------------------------------------------------------


def test_slurm_test_profile_is_the_users_profile():
    """profiles/slurm-test is profiles/slurm plus test settings only, so the test runs the users' profile."""
    users = yaml.safe_load((REPO / "profiles/slurm/config.yaml").read_text())
    test = TEST_PROFILE
    assert users["executor"] == "slurm"
    for key in ("retries", "jobs", "default-resources", "set-resources"):
        assert key in users, key
    defaults = dict(item.split("=", 1) for item in users["default-resources"])
    assert {"mem_mb", "runtime"} <= set(defaults)
    # meta: mem_mb and runtime are the rule's own (they depend on the mask and n_perm)
    assert {"zmap", "qc", "meta_sensitivity", "input_figures"} <= set(users["set-resources"])
    assert "meta" not in users["set-resources"]
    # batches of z-map jobs come from the workflow (rule zmap_batch), not from Snakemake's
    # group-components; one z-map at a time within a batch
    assert "groups" not in users and "group-components" not in users
    # (the one batch_slot per submission is the workflow's, also in the jobs Snakemake spawns)
    assert "resources" not in users and users["set-resource-scopes"] == ["batch_slots=local"]
    assert users["set-resources"]["zmap"]["batch_slots"] == 1
    assert users["set-resources"]["zmap"]["runtime"] == f"{ZMAP_MINUTES} * attempt"
    for key in set(users) | set(test):
        if key not in TEST_ONLY_KEYS:
            assert users.get(key) == test.get(key), key
    test_defaults = dict(item.split("=", 1) for item in test["default-resources"])
    assert test_defaults.pop("slurm_partition") == "debug"
    assert test_defaults == defaults
    assert 1 < BATCH < len(IMAGE_IDS) and len(IMAGE_IDS) % BATCH, "the test needs full and partial batches"
    # every line of the users' profile is commented: each setting has a comment line right above it
    lines = (REPO / "profiles/slurm/config.yaml").read_text().splitlines()
    for i, line in enumerate(lines):
        if line.strip() and not line.lstrip().startswith("#"):
            assert i > 0 and lines[i - 1].lstrip().startswith("#"), f"uncommented line {i + 1}: {line}"


@pytest.mark.e2e
def test_batches_in_a_dry_run(tmp_path):
    """Without a cluster: once the queries and the plan have run, a dry run with the SLURM test profile plans the
    10 z-map jobs as ceil(10 / BATCH) group jobs, each z-map in one of them with its batch's table
    job (Snakemake forms its groups twice when checkpoint outputs exist at start: Snakemake's own
    group-components then planned groups of 2, 4 and 10 for these 10 z-maps)."""
    wf = make_workdir(tmp_path, CONFIG, snapshot=SNAPSHOT)
    # the queries and the plan of batches (checkpoints: a dry run plans only what follows them)
    targets = [f"results/analyses/{a}/selection.tsv" for a in CONFIG["analyses"]]
    targets.append("results/batches/plan.tsv")
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    subprocess.run(
        [*SNAKEMAKE, *targets, "--cores", "1", "--configfile", "test.yaml"],
        cwd=wf,
        check=True,
        capture_output=True,
        env=env,
        timeout=RUN_TIMEOUT,
    )
    dry = subprocess.run(
        [*SNAKEMAKE, "-n", "--workflow-profile", "profiles/slurm-test", "--configfile", "test.yaml"],
        cwd=wf,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        timeout=RUN_TIMEOUT,
    )
    assert dry.returncode == 0, dry.stdout[-6000:]
    groups = [(name, sorted(f"{rule} {wc}" for rule, wc in jobs)) for name, jobs in group_jobs(dry.stdout)]
    assert dict(groups) == expected_batches(IMAGE_IDS) and len(groups) == len(BATCHES) == 3, groups
    assert [len(jobs) - 1 for _, jobs in sorted(groups)] == [4, 4, 2]
    assert not {"zmap", "zmap_batch"} & set(snakemake_jobs(dry.stdout)[0])


@pytest.mark.slurm
def test_every_job_went_through_sbatch(slurm_run):
    _, local = snakemake_jobs(slurm_run["log"])
    # the workflow's local rules ran here, everything else on the cluster
    assert local["download"] == 10 and local["query"] == 2, local
    check_submissions(slurm_run, EXPECTED_CLUSTER_JOBS, IMAGE_IDS)


@pytest.mark.slurm
def test_cluster_outputs_equal_local_outputs(slurm_run, local_run):
    wf = slurm_run["wf"]
    local_run = finish_local_run(local_run)
    local = compared_files(local_run)
    on_cluster = compared_files(wf)
    assert set(on_cluster) == set(local)
    # what is compared: tables, every z-map and qc.json, every meta-analysis map
    for analysis in ("edge", "pain"):
        for name in ("selection.tsv", "qc.tsv", "funnel.tsv"):
            assert f"analyses/{analysis}/{name}" in local
    assert "analyses/pain/meta/stouffer/z.nii.gz" in local and "analyses/pain/meta/sensitivity.tsv" in local
    assert sum(key.endswith("/zmap.nii.gz") for key in local) == 10
    differ = sorted(key for key in local if local[key] != on_cluster[key])
    assert not differ, f"cluster outputs differ from the local run's: {differ}"
    # per analysis 4 input figures (mean z, coverage, correlation, glass brains) and the QC
    # consensus figure; 3 z mosaics
    assert sum(key.endswith(".png") for key in local) == 13


@pytest.mark.slurm
def test_rerun_on_cluster_batches_what_is_missing(slurm_run, local_run, cluster):
    """A rerun (the queries' outputs there at start, where Snakemake forms its groups twice): six
    z-maps forced again are redone in the batches that hold them, one submission each with only
    those z-maps (two of batch 0, four of batch 1), each once; the other four z-maps and batch 2
    not at all; and the outputs are still those of the local run."""
    wf = slurm_run["wf"]
    redone = [*CONFIG["analyses"]["pain"]["image_ids"], 990031, 990032]
    forced = [f"results/images/{image_id}/zmap.nii.gz" for image_id in redone]
    before = {job["jobid"] for job in cluster.jobs()}
    code, text, elapsed = run_on_cluster(wf, cluster, "--forcerun", *forced, log_name="slurm_rerun.log")
    print(f"rerun on SLURM: {elapsed:.1f} s")
    assert code == 0, f"the rerun on SLURM failed ({code}):\n{text[-8000:]}\n{cluster.logs()}"
    rerun = {
        "log": text,
        "squeue": [job for job in cluster.jobs() if job["jobid"] not in before],
        "jobcomp": [row for row in cluster.completed_jobs() if row.get("JobId") not in before],
        "submitted": cluster.submissions(),
    }
    _, local = snakemake_jobs(text)
    assert not set(local) & LOCAL_RULES, local  # nothing downloaded or queried again
    # and the fan-ins that read them: both QC tables and figures, the three meta-analyses, the
    # sensitivity table, both input figures and both methods paragraphs
    expected = collections.Counter(
        {"zmap": len(redone), "qc": 2, "qc_figure": 2, "meta": 3, "meta_sensitivity": 1}
    ) + collections.Counter({"input_figures": 2, "methods": 2})
    assert sorted(map(len, expected_batches(redone).values())) == [3, 5]  # 2 and 4 z-maps + tables
    check_submissions(rerun, expected, sorted(redone))
    local = compared_files(finish_local_run(local_run))
    on_cluster = compared_files(wf)
    differ = sorted(key for key in local if local[key] != on_cluster.get(key))
    assert not differ, f"rerun outputs differ from the local run's: {differ}"
