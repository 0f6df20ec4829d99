"""A real, private, single-node SLURM cluster for tests (Debian's ``slurm-wlm`` and ``munge``).

Everything lives in one temporary directory: a munge key and socket, ``slurm.conf``, state,
spool, logs and PID files. ``/etc/slurm/slurm.conf`` is made a symbolic link to that
configuration while the cluster runs (the Snakemake job-step executor drops ``SLURM_CONF``
before its nested ``srun``); a real configuration already there is never replaced. The daemons
(``munged`` as user munge, ``slurmctld`` and ``slurmd`` as root) are started by hand in the
foreground, without systemd, on free TCP ports, so they do not touch a SLURM or munge already
running on the machine. Client tools find the cluster through ``SLURM_CONF`` (see
:meth:`SlurmCluster.env`).

Accounting is off: job status comes from ``squeue`` (``MinJobAge`` keeps finished jobs visible
for 10 minutes, far above 3 x the plugin's first status check) and every finished job is also
written to a job-completion log (``jobcomp/filetxt``), an independent record of what ran.

Stopping cancels the cluster's jobs first, then ends only the daemons this object started, by
their recorded PIDs, after checking ``/proc/PID/comm`` and that the command line names this
cluster's directory.

Usage::

    reason = ensure_installed()          # None, or why SLURM cannot be had (then skip)
    with SlurmCluster() as cluster:
        subprocess.run(["sbatch", ...], env=cluster.env())
"""

from __future__ import annotations

import atexit
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
INSTALL_SCRIPT = REPO / ".ci" / "install-slurm.sh"
EXECUTABLES = (
    "munged",
    "mungekey",
    "slurmctld",
    "slurmd",
    "sbatch",
    "squeue",
    "scontrol",
    "scancel",
    "sinfo",
)
PREFIX = "nvmeta-slurm-"
# Compiled-in default of Debian's SLURM. Needed besides SLURM_CONF: inside a job, the Snakemake
# slurm-jobstep executor drops SLURM_* variables (SLURM_CONF too) before its nested `srun`.
DEFAULT_CONF = Path("/etc/slurm/slurm.conf")
DAEMONS = ("munged", "slurmctld", "slurmd")


def which(name: str) -> str | None:
    """Path of an executable, also looking in the sbin directories (not on every PATH)."""
    path = os.environ.get("PATH", "") + ":/usr/sbin:/sbin:/usr/local/sbin"
    return shutil.which(name, path=path)


def missing_executables() -> list[str]:
    return [name for name in EXECUTABLES if which(name) is None]


def ensure_installed(timeout: float = 900) -> str | None:
    """Install ``slurm-wlm`` and ``munge`` with apt-get when missing.

    Returns
    -------
    str or None
        None when SLURM is usable, else the reason it cannot be installed here (not root,
        apt-get failed): a message to skip with.
    """
    if not missing_executables():
        return None
    if os.geteuid() != 0:
        return (
            f"SLURM is not installed (missing: {', '.join(missing_executables())}) and installing "
            "slurm-wlm/munge needs root: run as root or `sudo bash .ci/install-slurm.sh` first"
        )
    if shutil.which("apt-get") is None:
        return "SLURM is not installed and there is no apt-get to install slurm-wlm/munge (not Debian?)"
    proc = subprocess.run(
        ["bash", str(INSTALL_SCRIPT)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
    )
    if proc.returncode != 0:
        return f"apt-get install slurm-wlm munge failed ({proc.returncode}):\n{proc.stdout[-3000:]}"
    still = missing_executables()
    if still:
        return f"slurm-wlm/munge installed but executables still missing: {', '.join(still)}"
    return None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def total_memory_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    raise RuntimeError("no MemTotal in /proc/meminfo")


def _proc_comm(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return None


def _proc_cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _is_ours(pid: int, comm: str, base: Path) -> bool:
    """The process still is the daemon we started: same executable name, our directory on its command line."""
    return _proc_comm(pid) == comm and str(base) in _proc_cmdline(pid)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie of ours counts as gone
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _terminate(pid: int, comm: str, base: Path, timeout: float = 15.0) -> None:
    """SIGTERM then, if needed, SIGKILL one of our daemons, checked by /proc/PID/comm first."""
    if not _is_ours(pid, comm, base):
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(pid):
            return
        time.sleep(0.1)
    if _is_ours(pid, comm, base):
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)


def stop_stale_clusters(tmpdir: str | None = None) -> list[str]:
    """Stop daemons left by an earlier test process that died before stopping its cluster.

    Only PIDs recorded in ``pids.json`` of an earlier ``nvmeta-slurm-*`` directory are considered,
    and only when ``/proc/PID/comm`` and the command line still match. Returns what was stopped.
    """
    stopped = []
    root = Path(tmpdir or tempfile.gettempdir())
    for pids_file in root.glob(f"{PREFIX}*/pids.json"):
        base = pids_file.parent
        try:
            pids = json.loads(pids_file.read_text())
        except (OSError, ValueError):
            continue
        for comm in reversed(DAEMONS):
            pid = pids.get(comm)
            if pid and _is_ours(pid, comm, base):
                _terminate(pid, comm, base)
                stopped.append(f"{comm}[{pid}]")
        if DEFAULT_CONF.is_symlink() and os.readlink(DEFAULT_CONF).startswith(str(base) + "/"):
            DEFAULT_CONF.unlink()
        shutil.rmtree(base, ignore_errors=True)
    return stopped


class SlurmCluster:
    """A single-node SLURM cluster (``localhost``) in a private temporary directory.

    Parameters
    ----------
    cpus : int
        CPUs the node advertises (may exceed the machine's cores: ``config_overrides``).
    memory_mb : int or None
        The node's RealMemory; default 90 % of the machine's.
    partition : str
        Name of the (default) partition.
    min_job_age : int
        Seconds a finished job stays visible to ``squeue``.
    keep : bool
        Keep the directory (logs) after :meth:`stop`.
    """

    def __init__(
        self,
        cpus: int = 4,
        memory_mb: int | None = None,
        partition: str = "debug",
        min_job_age: int = 600,
        keep: bool = False,
    ) -> None:
        self.cpus = cpus
        self.memory_mb = memory_mb or int(total_memory_mb() * 0.9)
        self.partition = partition
        self.min_job_age = min_job_age
        self.keep = keep
        self.base: Path | None = None
        self.procs: dict[str, subprocess.Popen] = {}
        self._logs: list = []

    # paths ---------------------------------------------------------------------------------
    @property
    def conf(self) -> Path:
        return self.base / "etc" / "slurm.conf"

    @property
    def munge_socket(self) -> Path:
        return self.base / "munge" / "munge.socket"

    @property
    def jobcomp_log(self) -> Path:
        return self.base / "log" / "jobcomp.log"

    @property
    def slurmctld_log(self) -> Path:
        return self.base / "log" / "slurmctld.log"

    def env(self, base_env: dict | None = None) -> dict:
        """Environment for client tools and Snakemake: ``SLURM_CONF`` pointing at this cluster."""
        env = dict(os.environ if base_env is None else base_env)
        env["SLURM_CONF"] = str(self.conf)
        # the sbin directories hold nothing the clients need, but keep PATH as the caller had it
        return env

    # lifecycle -----------------------------------------------------------------------------
    def __enter__(self) -> SlurmCluster:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self, timeout: float = 60.0) -> None:
        """Write the configuration, start munged, slurmctld and slurmd, wait until the node is idle."""
        if os.geteuid() != 0:
            raise RuntimeError("starting slurmctld/slurmd/munged needs root")
        missing = missing_executables()
        if missing:
            raise RuntimeError(f"SLURM executables missing: {missing}; run .ci/install-slurm.sh")
        stop_stale_clusters()
        self.base = Path(tempfile.mkdtemp(prefix=PREFIX))
        # munged (user munge) must traverse it; root-owned and not writable by others is what munge wants.
        os.chmod(self.base, 0o755)
        for sub in ("etc", "state", "spool", "log", "run"):
            (self.base / sub).mkdir(mode=0o755)
        atexit.register(self.stop)
        try:
            self._start_munged(timeout)
            self._write_conf()
            self._link_default_conf()
            self._start("slurmctld", [which("slurmctld"), "-D", "-c", "-f", str(self.conf)])
            self._wait(lambda: self._run(["scontrol", "ping"]).stdout.count("UP") > 0, timeout, "slurmctld")
            self._start("slurmd", [which("slurmd"), "-D", "-c", "-N", "localhost", "-f", str(self.conf)])
            self._wait(self._node_idle, timeout, "slurmd (node idle)")
        except BaseException:
            self.stop()
            raise

    def _start_munged(self, timeout: float) -> None:
        munge = pwd.getpwnam("munge")
        mdir = self.base / "munge"
        mdir.mkdir()
        # clients (root here, any user on a real node) need execute permission on the socket's directory
        os.chmod(mdir, 0o711)
        key = mdir / "munge.key"
        subprocess.run([which("mungekey"), "--create", f"--keyfile={key}"], check=True, capture_output=True)
        for path in (mdir, key):
            os.chown(path, munge.pw_uid, munge.pw_gid)
        os.chmod(key, 0o600)
        cmd = [
            which("munged"),
            "--foreground",
            f"--socket={self.munge_socket}",
            f"--key-file={key}",
            f"--pid-file={mdir / 'munged.pid'}",
            f"--log-file={mdir / 'munged.log'}",
            f"--seed-file={mdir / 'munged.seed'}",
        ]
        self._start("munged", cmd, user=munge.pw_uid, group=munge.pw_gid)
        self._wait(self.munge_socket.exists, timeout, "munged socket")

    def _write_conf(self) -> None:
        b = self.base
        text = f"""# Written by tests/slurm_cluster.py: a private single-node cluster.
ClusterName=nvmeta-test
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket}
SlurmUser=root
SlurmdUser=root
StateSaveLocation={b / "state"}
SlurmdSpoolDir={b / "spool"}/slurmd-%n
SlurmctldPidFile={b / "run" / "slurmctld.pid"}
SlurmdPidFile={b / "run" / "slurmd-%n.pid"}
SlurmctldLogFile={self.slurmctld_log}
SlurmdLogFile={b / "log" / "slurmd.log"}
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc={self.jobcomp_log}
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
ReturnToService=2
MinJobAge={self.min_job_age}
InactiveLimit=0
KillWait=5
Waittime=0
NodeName=localhost NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory={self.memory_mb} State=UNKNOWN
PartitionName={self.partition} Nodes=localhost Default=YES MaxTime=INFINITE State=UP
"""
        self.conf.write_text(text)

    def _link_default_conf(self) -> None:
        """Point /etc/slurm/slurm.conf at our configuration (if nothing but a stale link of ours is there)."""
        link = DEFAULT_CONF
        if link.is_symlink():
            target = os.readlink(link)
            if Path(target).parent.parent.name.startswith(PREFIX):
                link.unlink()  # left by an earlier test cluster
            else:
                raise RuntimeError(f"{link} is a link to {target}, not one of ours: refusing to replace it")
        elif link.exists():
            raise RuntimeError(
                f"{link} exists: this machine has a SLURM configuration of its own; the test cluster "
                "needs that path for jobs' nested srun and will not replace a real configuration"
            )
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(self.conf)
        self._linked = True

    def _unlink_default_conf(self) -> None:
        if (
            getattr(self, "_linked", False)
            and DEFAULT_CONF.is_symlink()
            and os.readlink(DEFAULT_CONF) == str(self.conf)
        ):
            DEFAULT_CONF.unlink()
        self._linked = False

    def _start(self, name: str, cmd: list[str], **kwargs) -> None:
        log = open(self.base / "log" / f"{name}.stdout", "wb")  # noqa: SIM115 (closed in stop)
        self._logs.append(log)
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=self.env(),
            cwd=self.base,
            **kwargs,
        )
        self.procs[name] = proc
        (self.base / "pids.json").write_text(json.dumps({n: p.pid for n, p in self.procs.items()}))

    def _run(self, cmd: list[str], check: bool = False, timeout: float = 30) -> subprocess.CompletedProcess:
        return subprocess.run(
            [which(cmd[0]), *cmd[1:]],
            env=self.env(),
            capture_output=True,
            text=True,
            check=check,
            timeout=timeout,
        )

    def _node_idle(self) -> bool:
        out = self._run(["sinfo", "-h", "-N", "-n", "localhost", "-o", "%T"]).stdout.strip()
        return out.startswith("idle")

    def _wait(self, condition, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(
                        f"{name} exited ({proc.returncode}) while waiting for {what}:\n{self.logs()}"
                    )
            if condition():
                return
            time.sleep(0.2)
        raise TimeoutError(f"timed out after {timeout}s waiting for {what}:\n{self.logs()}")

    def logs(self, tail: int = 4000) -> str:
        """The tails of the daemons' logs (for error messages)."""
        if self.base is None:
            return ""
        parts = []
        for path in sorted((self.base / "log").glob("*")) + [self.base / "munge" / "munged.log"]:
            try:
                parts.append(f"--- {path.name}\n{path.read_text(errors='replace')[-tail:]}")
            except OSError:
                pass
        return "\n".join(parts)

    def stop(self) -> None:
        """Cancel the cluster's jobs, then stop slurmd, slurmctld and munged (ours only, by PID)."""
        if self.base is None:
            return
        base = self.base
        ctld = self.procs.get("slurmctld")
        if ctld is not None and ctld.poll() is None:
            try:
                self._run(["scancel", "--user", "root"], timeout=15)
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline and self.active_jobs():
                    time.sleep(0.5)
            except (subprocess.SubprocessError, OSError):
                pass
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self.procs.get(name)
            if proc is None:
                continue
            if proc.poll() is None:
                comm = Path(proc.args[0]).name[:15]
                _terminate(proc.pid, comm, base)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        self._unlink_default_conf()
        for log in self._logs:
            log.close()
        self._logs.clear()
        self.procs.clear()
        atexit.unregister(self.stop)
        if not self.keep:
            shutil.rmtree(base, ignore_errors=True)
        else:
            (base / "pids.json").unlink(missing_ok=True)
        self.base = None

    # queries -------------------------------------------------------------------------------
    def active_jobs(self) -> list[str]:
        """Job ids still pending, running or completing."""
        out = self._run(["squeue", "-h", "-t", "PD,R,CG,CF,S", "-o", "%i"]).stdout
        return out.split()

    def jobs(self) -> list[dict]:
        """Every job the controller knows (finished ones for ``MinJobAge`` s): id, name, state,
        partition, memory, time limit, CPUs and comment."""
        fields = {"jobid": "%i", "name": "%j", "state": "%T", "partition": "%P", "memory": "%m"}
        fields.update(time_limit="%l", cpus="%C", comment="%k")  # the comment last: it may hold "|"
        out = self._run(["squeue", "-h", "--states=all", "-o", "|".join(fields.values())], check=True).stdout
        return [dict(zip(fields, line.split("|", len(fields) - 1), strict=True)) for line in out.splitlines()]

    def completed_jobs(self) -> list[dict]:
        """Finished jobs from the job-completion log (``jobcomp/filetxt``): one dict of its fields per job."""
        if not self.jobcomp_log.exists():
            return []
        rows = []
        for line in self.jobcomp_log.read_text().splitlines():
            fields = {}
            for item in line.split():
                if "=" in item:
                    key, value = item.split("=", 1)
                    fields[key] = value
            if fields:
                rows.append(fields)
        return rows

    def submissions(self) -> list[str]:
        """Job ids of every ``sbatch`` submission slurmctld logged."""
        if not self.slurmctld_log.exists():
            return []
        ids = []
        for line in self.slurmctld_log.read_text(errors="replace").splitlines():
            if "_slurm_rpc_submit_batch_job:" in line and "JobId=" in line:
                ids.append(line.split("JobId=", 1)[1].split()[0])
        return ids
