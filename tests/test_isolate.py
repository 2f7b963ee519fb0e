"""`ccl.pipeline.isolate.Isolated`, the one supervisor of crash-isolated decoding, on a toy handler: a crash or a
hang costs the item it happened on, in a forked child and in a fresh interpreter alike; a crash inside a group
is narrowed to its item; a bug of ours is raised with its traceback, not taken for a bad item."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from ccl.pipeline.isolate import Isolated


def toy(crash=(), hang=(), bug=(), refuse=(), group=1, fail_make=False):
    """A handler over `job` items (an int): refuses some, crashes (SIGSEGV), hangs or raises on others; works
    `group` items at a time at and above single_until, like DALI's batches."""
    if fail_make:
        raise ValueError("the handler could not be built")

    def handle(job, start, single_until, word):
        failed, j = [], start
        while j < job:
            word.set(j)
            step = 1 if j < single_until else min(group, job - j)
            span = range(j, j + step)
            if any(k in crash for k in span):
                os.kill(os.getpid(), signal.SIGSEGV)
            if any(k in hang for k in span):
                time.sleep(3600)
            if any(k in bug for k in span):
                raise ValueError("a bug of ours")
            failed += [(k, "refused") for k in span if k in refuse]
            j += step
        return failed

    return handle


@pytest.fixture(params=["fork", "exec"])
def fork(request, monkeypatch):
    # A fresh interpreter unpickles `toy` by module name: it must find this folder.
    here = [str(Path(__file__).parent), os.environ.get("PYTHONPATH")]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in here if p))
    return request.param == "fork"


@pytest.mark.timeout(120)
def test_crash_costs_one_item_and_the_child_is_replaced(fork):
    w = Isolated(toy, ((3, 7), (), (), (8,)), fork=fork)
    try:
        seen = []
        failed = w.run(10, 10, seen.append)
        assert [(p, why.split(" (")[0]) for p, why in failed] == [(3, "the decoder crashed"), (7, "the decoder crashed"),
                                                                  (8, "refused")]
        assert "SIGSEGV" in failed[0][1] and w.restarts == 2 and sum(seen) == 10
        assert w.run(3, 3) == []  # a new child serves the next job
    finally:
        w.close()


@pytest.mark.timeout(120)
def test_a_crash_in_a_group_is_narrowed_to_its_item(fork):
    w = Isolated(toy, ((6,), (), (), (), 4), fork=fork, batch=4)
    try:
        assert [p for p, _ in w.run(11, 11)] == [6]
        assert w.restarts == 2  # the group [4, 8), then item 6 alone
    finally:
        w.close()


@pytest.mark.timeout(120)
def test_a_hang_is_killed_and_named(fork):
    w = Isolated(toy, ((), (2,)), fork=fork, stall_s=1.0)
    try:
        failed = w.run(5, 5)
        assert [p for p, _ in failed] == [2] and "hung" in failed[0][1]
    finally:
        w.close()


@pytest.mark.timeout(120)
def test_a_bug_is_raised_with_its_traceback(fork):
    w = Isolated(toy, ((), (), (1,)), fork=fork)
    try:
        with pytest.raises(RuntimeError, match="(?s)failed:.*ValueError: a bug of ours"):
            w.run(4, 4)
    finally:
        w.close()
    w = Isolated(toy, ((), (), (), (), 1, True), fork=fork)
    try:
        with pytest.raises(RuntimeError, match="(?s)did not start.*could not be built"):
            w.run(4, 4)
    finally:
        w.close()
