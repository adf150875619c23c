import os

import pytest

from core.utils.parallel import map_processes


def _pid_square(x: int, offset: int) -> tuple[int, int]:
    if x < 0:
        raise ValueError(f"negative item {x}")
    return x * x + offset, os.getpid()


def test_sequential_runs_in_this_process_in_order():
    out = map_processes(_pid_square, [3, 1, 2], 10, workers=1)
    assert [v for v, _ in out] == [19, 11, 14]
    assert {pid for _, pid in out} == {os.getpid()}


def test_workers_run_elsewhere_and_keep_order():
    out = map_processes(_pid_square, [3, 1, 2], 0, workers=2)
    assert [v for v, _ in out] == [9, 1, 4]
    assert os.getpid() not in {pid for _, pid in out}


def test_worker_error_propagates():
    with pytest.raises(ValueError, match="negative item -1"):
        map_processes(_pid_square, [1, -1], 0, workers=2)


def test_bad_counts():
    with pytest.raises(ValueError, match="workers and threads"):
        map_processes(_pid_square, [1], 0, workers=0)


def _make_state(base: int) -> dict:
    return {"base": base, "pid": os.getpid()}


def _add_base(x: int, state: dict) -> tuple[int, int]:
    return x + state["base"], state["pid"]


def test_imap_builds_state_once_per_worker():
    from core.utils.parallel import imap_processes

    here = list(imap_processes(_add_base, [1, 2], init=_make_state, init_args=(10,)))
    assert here == [(11, os.getpid()), (12, os.getpid())]
    out = list(imap_processes(_add_base, [1, 2, 3], init=_make_state, init_args=(5,), workers=2))
    assert sorted(v for v, _ in out) == [6, 7, 8]  # unordered: as they finish
    assert os.getpid() not in {pid for _, pid in out}
