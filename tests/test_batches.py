"""Batches of z-map jobs (nvmeta.workflow.batches): the plan and the batch table, by hand."""

from __future__ import annotations

import json
import math
import random

import pytest

from nvmeta.workflow.batches import plan_batches, plan_job, read_plan, write_batch_table


def test_ids_sorted_and_cut_into_consecutive_batches():
    # two analyses sharing ids 3 and 9, in no order
    plan = plan_batches([9, 3, 5, 1, 3, 7, 2, 9], 4)
    assert plan.members == ((1, 2, 3, 5), (7, 9))
    assert plan.batch_of == {1: 0, 2: 0, 3: 0, 5: 0, 7: 1, 9: 1}
    assert len(plan) == 2
    assert plan_batches([4, 2], 50).members == ((2, 4),)
    assert plan_batches([], 50).members == ()
    assert plan_batches([8, 6, 7], 1).members == ((6,), (7,), (8,))


@pytest.mark.parametrize("size", [1, 3, 50])
def test_every_image_in_exactly_one_batch_of_at_most_size(size):
    rng = random.Random(size)
    ids = [rng.randrange(1, 10**6) for _ in range(1000)]
    plan = plan_batches(ids, size)
    distinct = sorted(set(ids))
    assert len(plan) == math.ceil(len(distinct) / size)
    assert [i for batch in plan.members for i in batch] == distinct
    assert all(len(batch) == size for batch in plan.members[:-1]) and 1 <= len(plan.members[-1]) <= size
    assert all(plan.members[plan.batch_of[i]].count(i) == 1 for i in distinct)


def test_an_id_above_all_others_changes_the_last_batch_only():
    """New NeuroVault images get higher ids: adding one leaves every earlier batch as it was."""
    before = plan_batches(range(1, 11), 4).members
    after = plan_batches([*range(1, 11), 99], 4).members
    assert after[:-1] == before[:-1] and after[-1] == (9, 10, 99)


def test_batch_size_below_one_is_refused():
    with pytest.raises(ValueError, match="at least 1"):
        plan_batches([1], 0)


def test_batch_table_lists_each_image_and_its_outcome(tmp_path):
    qcs = {
        12: {"status": "included", "reason": None},
        3: {"status": "excluded", "reason": "no finite data"},
        7: {"status": "excluded", "reason": "download failed:\ttab\nnewline"},
    }
    paths = []
    for image_id, qc in qcs.items():
        path = tmp_path / "images" / str(image_id) / "qc.json"
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps(qc))
        paths.append(str(path))
    out = tmp_path / "batches" / "zmaps_0.tsv"
    write_batch_table(paths, out)
    assert out.read_text() == (
        "image_id\tstatus\treason\n"
        "3\texcluded\tno finite data\n"
        "7\texcluded\tdownload failed: tab newline\n"
        "12\tincluded\t\n"
    )
    assert [p.name for p in out.parent.iterdir()] == ["zmaps_0.tsv"]  # no temporary left


def test_plan_over_every_selection_is_written_and_read_back(tmp_path):
    """The plan job's file: every selected image once, by id, with its batch; read_plan gives the
    same plan back."""
    a = tmp_path / "A.tsv"
    b = tmp_path / "B.tsv"
    a.write_text("image_id\tcollection_id\n30\t1\n10\t1\n")
    b.write_text("image_id\tcollection_id\n20\t2\n10\t1\n40\t2\n")
    out = tmp_path / "batches" / "plan.tsv"
    plan = plan_job([str(a), str(b)], 3, str(out), str(tmp_path / "plan.log"))
    assert out.read_text() == "image_id\tbatch\n10\t0\n20\t0\n30\t0\n40\t1\n"
    assert plan.members == ((10, 20, 30), (40,))
    assert read_plan(out) == plan
    out.write_text("image_id\tbatch\n10\t1\n20\t0\n")
    with pytest.raises(ValueError, match="out of order"):
        read_plan(out)
