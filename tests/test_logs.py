"""Per-job logging (nvmeta.workflow.logs): module loggers reach the job's log; parallel jobs never mix."""

from __future__ import annotations

import logging
import subprocess
import sys
import threading

import pytest

from nvmeta.workflow.logs import job_log


def test_module_loggers_reach_the_job_log_and_threads_do_not_mix(tmp_path):
    module_logger = logging.getLogger("nvmeta.neurovault")  # any module logger, not the job's own
    barrier = threading.Barrier(2)

    def job(k: int) -> None:
        with job_log(f"nvmeta.images.download.{k}", tmp_path / f"{k}.log") as log:
            for i in range(50):
                log.info("job %d own line %d", k, i)
                module_logger.warning("job %d module line %d", k, i)
                if i == 10:
                    barrier.wait()  # both jobs are logging at the same time

    threads = [threading.Thread(target=job, args=(k,)) for k in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for k, other in ((1, 2), (2, 1)):
        text = (tmp_path / f"{k}.log").read_text()
        assert text.count(f"job {k} own line") == 50 and text.count(f"job {k} module line") == 50
        assert f"job {other}" not in text
    assert not [h for h in logging.getLogger("nvmeta").handlers if isinstance(h, logging.FileHandler)]
    assert "nvmeta.images.download.1" not in logging.Logger.manager.loggerDict


def test_exception_in_a_job_is_logged_with_its_traceback(tmp_path):
    with pytest.raises(ValueError), job_log("nvmeta.images.zmap.7", tmp_path / "7.log"):
        raise ValueError("broken header")
    text = (tmp_path / "7.log").read_text()
    assert "ERROR ValueError: broken header" in text and "Traceback (most recent call last)" in text


def test_script_job_traceback_goes_to_the_log_and_one_line_to_stderr(tmp_path):
    """A script job (own process): warnings and module records reach the log; an uncaught
    exception leaves its traceback in the log and a single line on stderr."""
    log = tmp_path / "job.log"
    code = (
        "import logging, warnings\n"
        "from nvmeta.workflow.logs import job_logger\n"
        f"log = job_logger('nvmeta.select.query', {str(log)!r})\n"
        "logging.getLogger('nvmeta.select.filters').info('from a module')\n"
        "warnings.warn('a captured warning')\n"
        "raise RuntimeError('server unreachable')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 1
    text = log.read_text()
    assert "from a module" in text and "a captured warning" in text
    assert "Traceback (most recent call last)" in text and "RuntimeError: server unreachable" in text
    assert "Traceback" not in proc.stderr
    assert [line for line in proc.stderr.splitlines() if "server unreachable" in line] == [
        next(line for line in proc.stderr.splitlines() if "ERROR" in line)
    ]
    assert f"traceback in {log}" in proc.stderr


def test_ctrl_c_in_a_script_job_goes_to_its_log_only(tmp_path):
    """Ctrl-C reaches every job of the run at once: a script job whose logging is set up
    (job_logger) writes one line to its log and nothing to the terminal, where Snakemake reports
    the interrupted jobs; it still ends as killed by SIGINT, as Python does."""
    import signal

    log = tmp_path / "job.log"
    code = (
        "from nvmeta.workflow.logs import job_logger\n"
        f"job_logger('nvmeta.meta', {str(log)!r}).info('started')\n"
        "raise KeyboardInterrupt\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == -signal.SIGINT
    assert proc.stderr.splitlines() == [next(x for x in proc.stderr.splitlines() if "started" in x)]
    lines = log.read_text().splitlines()
    assert [x.split(" ", 2)[2] for x in lines] == ["INFO started", "WARNING interrupted (Ctrl-C)"]


@pytest.mark.parametrize("where", [".snakemake/scripts", "elsewhere"])
def test_importing_nvmeta_changes_no_process_state(tmp_path, where):
    """Importing nvmeta (what every script job does first, from Snakemake's
    ``.snakemake/scripts/tmp*.py``) leaves the interpreter as it was: the excepthook, the SIGINT
    handler and the garbage collector's settings, whatever the environment says."""
    import os

    folder = tmp_path / where
    folder.mkdir(parents=True)
    script = folder / "tmpabc.meta.py"
    script.write_text(
        "import gc, signal, sys\n"
        "before = (sys.excepthook, signal.getsignal(signal.SIGINT), gc.get_threshold())\n"
        "import nvmeta, nvmeta.workflow.logs, nvmeta.workflow.config, nvmeta.workflow.jobs\n"
        "after = (sys.excepthook, signal.getsignal(signal.SIGINT), gc.get_threshold())\n"
        "print(before == after, gc.get_freeze_count())\n"
    )
    env = dict(os.environ, NVMETA_INTERRUPTED="1")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env)
    assert (proc.returncode, proc.stdout.split()) == (0, ["True", "0"]), proc.stderr


def test_job_log_echo_writes_this_threads_records_to_stderr_in_one_line(tmp_path, capsys):
    """``job_log(..., echo=True)`` (in-process QC and overview jobs): the job's records reach the
    terminal as a script job's do, tracebacks only to the file, another thread's never."""

    def other() -> None:  # another job's thread, logging while this job runs
        logging.getLogger("nvmeta.images.zmap").warning("another job's line")

    with pytest.raises(OSError), job_log("nvmeta.images.qc.A", tmp_path / "qc.log", echo=True) as log:
        log.info("QC: 3 selected, 3 included")
        t = threading.Thread(target=other)
        t.start()
        t.join()
        logging.getLogger("nvmeta.images.qc").warning("a module's warning")
        raise OSError("disk full")
    logging.getLogger("nvmeta.images.zmap").warning("after the job")
    err = capsys.readouterr().err.splitlines()
    assert [x.split(" ", 2)[2] for x in err] == [
        "INFO QC: 3 selected, 3 included",
        "WARNING a module's warning",
        "ERROR OSError: disk full",
    ]
    text = (tmp_path / "qc.log").read_text()
    assert "Traceback (most recent call last)" in text and "another job" not in text
    assert not logging.getLogger("nvmeta").handlers
