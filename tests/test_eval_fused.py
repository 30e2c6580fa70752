"""ov3common.heap: heap_reuse keeps large freed blocks for reuse (no page faults on reallocation), and restores glibc's
behaviour on exit. (ConvReLU's bitwise parity with conv2d + ReLU is tested with the Inception in test_eval_fid.)"""

import gc
import platform
import resource

import pytest
import torch

from ov3common.heap import _heap_depth, heap_reuse
from ov3common.trainer import Loop

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="heap_reuse acts on glibc only")

MB = 1 << 20


@pytest.fixture(autouse=True)
def _no_heap_reuse_left_open():
    """A training loop that ended in an exception keeps its generator (and its heap_reuse) alive until the cyclic
    garbage collector frees the traceback: collect first, so each test starts from glibc's defaults."""
    gc.collect()
    assert _heap_depth[0] == 0


def _faults_of_reallocations(n: int = 8, size: int = 96 * MB) -> int:
    """Minor page faults while a block larger than glibc's largest mmap threshold (32 MB) is allocated, written and
    freed ``n`` times after a first time."""
    torch.ones(size // 4).sum()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(n):
        torch.ones(size // 4).sum()  # allocate, touch every page, free
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def test_heap_reuse_avoids_page_faults_and_is_undone_on_exit():
    pages = 8 * 96 * MB // 4096  # what re-faulting every page of every allocation costs
    outside = _faults_of_reallocations()
    with heap_reuse():
        with heap_reuse():  # nested: the inner one leaves the setting to the outer one
            pass
        inside = _faults_of_reallocations()
    after = _faults_of_reallocations()
    assert outside > 0.5 * pages  # glibc mmaps and unmaps such a block each time
    assert inside < 0.2 * pages  # reused from the heap (at most the first reallocation grows it)
    assert after > 0.5 * pages  # restored: large blocks are mmap'd again (and the heap was returned)


@pytest.mark.parametrize("reuse", [True, False])
def test_training_loop_runs_its_steps_under_heap_reuse_when_asked(tmp_path, reuse):
    """ov3common.trainer.Loop(heap_reuse=True) (the trainers on CPU): every step runs under heap_reuse (a step's
    large tensors come back from the heap without page faults) and the setting ends with the loop; with False the
    loop leaves glibc alone. (Faults without heap_reuse depend on what the heap holds from earlier tests, so the
    False case checks the setting itself.)"""
    pages = 2 * 96 * MB // 4096
    loop = Loop(tmp_path, 3, "heap", heap_reuse=reuse)
    depth, faults = [], []
    for _ in loop.batches(lambda new_epoch: range(10)):
        depth.append(_heap_depth[0])
        faults.append(_faults_of_reallocations(n=2))
        loop.advance()
    assert depth == [int(reuse)] * 3 and _heap_depth[0] == 0
    if reuse:
        assert max(faults[1:]) < 0.2 * pages
