"""Batches of per-image jobs on a cluster (``groups`` + ``group-components`` in profiles/slurm),
made safe for a workflow whose per-image jobs come after checkpoints.

Why this module exists (hand-written on purpose: Snakemake's own grouping is what profiles/slurm
uses; this only repairs how Snakemake 9 re-forms the batches). Found in snakemake 9.27.1
(``snakemake/dag.py``; the same code is in the 9.25.2 sources):

* ``DAG.update_groups`` forms the groups anew each time the DAG is post-processed: at start (twice
  when checkpoint outputs already exist: after the checkpoint update and again before scheduling),
  after every checkpoint that finishes, and once more while an input function still waits for a
  checkpoint.
* ``DAG._update_group_components`` then merges each chunk of connected components *in place* into
  the chunk's first ``GroupJob``, an object that ``GroupJobFactory`` keeps cached under its
  original one-job key and whose hash (``GroupJob.__hash__`` is ``hash(self.jobs)``) changes with
  it. The next pass gets the enlarged object back for that one job and merges again, and the
  chunks are taken from a set, in no fixed order.

Seen in a dry run of the SLURM test's config (tests/test_slurm.py::test_batches_in_a_dry_run) and
on the real test cluster with a small two-checkpoint workflow: 10 z-map jobs in groups of 4 became
4, 4, 2, then one group of 10; the groups formed first stayed in the scheduler's ready set next to
the new one and were submitted too (4 submissions, every z-map job in two of them, run
concurrently, writing the same files); and when a checkpoint finished while groups ran, groups
were formed again around some of their jobs and submitted again (Snakemake issue #1628,
snakemake-executor-plugin-slurm issue #253, both open).

:func:`install` replaces ``DAG._update_group_components`` with :func:`stable_group_components`:
chunks are formed in a fixed order (by the jobs' rule names and outputs) as new group objects
obtained from the factory under their full job set, so that the same jobs give the same, equal
group every time; a group being executed keeps its jobs; and a ready group that a later pass no
longer forms leaves the ready set. Together with the barrier in ``workflow/rules/common.smk`` (no
per-image job enters the DAG before every query checkpoint has finished), N z-map jobs are sent as
exactly ceil(N / size) submissions, each job in exactly one of them.

Only the group-components step is replaced: groups made of connected jobs of several rules (not
used here) still go through Snakemake's own merging in ``DAG.update_groups``.
"""

from __future__ import annotations

from collections import defaultdict

__all__ = ["batches_requested", "install", "stable_group_components"]

# What the replacement relies on in snakemake.dag.DAG; install() patches nothing when one is
# missing, and batches_requested() then stops a run that asks for batches with a message.
_DAG_ATTRIBUTES = ("_update_group_components", "update_groups")
_installed = False


def batches_requested(workflow) -> bool:
    """True when some group is to span several DAG components (``group-components`` > 1).

    Only meaningful once Snakemake has applied its settings, i.e. in input functions (while the
    Snakefile is parsed, the group settings are still empty). Raises ``WorkflowError`` when batches
    are requested but :func:`install` could not replace Snakemake's grouping step.
    """
    if not any(n > 1 for n in workflow.group_settings.group_components.values()):
        return False
    if not _installed:
        from snakemake.exceptions import WorkflowError

        raise WorkflowError(
            "group-components is set (profiles/slurm), but this Snakemake's DAG lacks "
            f"one of {', '.join(_DAG_ATTRIBUTES)}, which nvmeta/snakemake_groups.py needs to "
            "batch per-image jobs safely. Fix: remove `groups` and `group-components` from the "
            "profile (one submission per job), or use the Snakemake version in pyproject.toml."
        )
    return True


def _job_key(job) -> tuple[str, str]:
    outputs = sorted(str(f) for f in job.output)
    return job.rule.name, outputs[0] if outputs else repr(sorted(job.wildcards_dict.items()))


def _component_key(group) -> tuple[str, str]:
    return min(_job_key(job) for job in group.jobs)


def stable_group_components(self) -> None:
    """Replacement of ``snakemake.dag.DAG._update_group_components`` (see the module docstring).

    Runs at the end of ``DAG.update_groups``, when ``self._group`` maps every needrun job of a
    group to its connected component (one ``GroupJob`` per component).
    """
    settings = self.workflow.group_settings.group_components
    parents = self.workflow.parent_groupids
    # jobs of groups already handed to the executor stay in those groups
    running = {job: group for group in self._running if group.is_group() for job in group.jobs}
    components_by_id = defaultdict(set)
    for group in self._group.values():
        components_by_id[group.groupid].add(group)
    for groupid, components in components_by_id.items():
        size = settings.get(parents.get(groupid, groupid), 1)
        if size <= 1:
            continue
        free = []
        for component in components:
            owner = next((running[job] for job in component.jobs if job in running), None)
            if owner is None:
                free.append(component)
            else:
                for job in component.jobs:
                    self._group[job] = owner
        free.sort(key=_component_key)
        for start in range(0, len(free), size):
            jobs = frozenset().union(*(c.jobs for c in free[start : start + size]))
            # a fresh (or the cached, equal) group for exactly these jobs; nothing is merged in place
            group = self.group_job_factory.new(groupid, jobs, self.workflow.global_resources)
            for job in jobs:
                self._group[job] = group
    current = set(self._group.values())
    for group in current:
        group.finalize()
    # a ready group of an earlier pass that is not formed any more must not be submitted as well
    self._ready_jobs.difference_update(
        [job for job in self._ready_jobs if job.is_group() and job not in current]
    )


def install() -> bool:
    """Use :func:`stable_group_components` in this Snakemake process (idempotent).

    Called while the Snakefile is parsed, before any group is formed. Without group-components
    the replacement does what Snakemake's own step does (nothing but finalising the groups), so
    local runs are unaffected. Returns False, patching nothing, when Snakemake's DAG lacks what
    the replacement relies on.
    """
    global _installed
    from snakemake.dag import DAG

    if not all(hasattr(DAG, name) for name in _DAG_ATTRIBUTES):
        return False
    DAG._update_group_components = stable_group_components
    _installed = True
    return True
