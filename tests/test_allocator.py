"""napari_langmamba.allocator: large blocks from the heap inside the scope, mmap'd outside."""

from __future__ import annotations

import ctypes
import threading

import numpy as np
import pytest

from napari_langmamba import allocator
from napari_langmamba.allocator import heap_allocations, heap_allocations_available

pytestmark = pytest.mark.skipif(not heap_allocations_available(), reason="needs glibc's malloc (Linux)")


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def _mmapped_bytes() -> int:
    libc = allocator._glibc()
    libc.mallinfo2.restype = _MallInfo2
    return libc.mallinfo2().hblkhd  # bytes in blocks malloc got from mmap


def _grows_mmapped_bytes() -> bool:
    """Whether a new large block is an mmap'd block.

    The block is larger than any mmap threshold and than all free heap memory: malloc serves
    a request from a free heap chunk that fits before it considers mmap.
    """
    libc = allocator._glibc()
    libc.mallinfo2.restype = _MallInfo2
    nbytes = max(96 << 20, libc.mallinfo2().fordblks + (64 << 20))
    before = _mmapped_bytes()
    block = np.ones(nbytes, dtype=np.uint8)  # touched, so it is really allocated
    grew = _mmapped_bytes() - before >= nbytes
    del block
    return grew


def test_large_blocks_come_from_the_heap_only_inside_the_scope():
    assert _grows_mmapped_bytes()
    with heap_allocations():
        assert not _grows_mmapped_bytes()
        with heap_allocations():  # nested: still in effect after the inner scope closes
            assert not _grows_mmapped_bytes()
        assert not _grows_mmapped_bytes()
    assert _grows_mmapped_bytes()
    assert allocator._depth == 0


def test_the_scope_is_counted_across_threads_and_restored_after_an_error():
    entered, release = threading.Event(), threading.Event()

    def worker():
        with heap_allocations():
            entered.set()
            release.wait(10)

    thread = threading.Thread(target=worker)
    thread.start()
    assert entered.wait(10)
    with pytest.raises(RuntimeError), heap_allocations():
        raise RuntimeError("boom")
    assert not _grows_mmapped_bytes()  # the other thread's scope is still open
    release.set()
    thread.join(10)
    assert _grows_mmapped_bytes()
    assert allocator._depth == 0


def test_denoising_runs_inside_the_scope_and_allocates_its_result_outside(monkeypatch):
    """The denoiser's batches run in the scope; its result volume is not a heap block."""
    import torch

    from napari_langmamba.inference import Denoiser
    from napari_langmamba.models.redcnn import REDCNN, REDCNNConfig

    depths = []
    model = REDCNN(REDCNNConfig.preset("tiny")).eval()
    original = model.forward
    monkeypatch.setattr(model, "forward", lambda x: depths.append(allocator._depth) or original(x))
    denoiser = Denoiser(model, device=torch.device("cpu"))
    before = _mmapped_bytes()
    out = denoiser.denoise(np.zeros((200, 256, 256), dtype=np.float32), batch_size=50)
    assert out.shape == (200, 256, 256)
    assert depths == [1, 1, 1, 1]
    assert _mmapped_bytes() - before >= out.nbytes  # the 52 MB result: mmap'd, returned when freed
    assert allocator._depth == 0


def test_every_training_stage_runs_inside_the_scope(monkeypatch):
    import sys
    import types

    import training.__main__ as entry

    depths = []
    stage = types.ModuleType("fake_stage")
    stage.add_arguments = lambda parser: parser.add_argument("--x", type=int, default=0)
    stage.main = lambda args: depths.append((allocator._depth, args.x)) or 0
    monkeypatch.setitem(sys.modules, "fake_stage", stage)
    monkeypatch.setitem(entry.STAGES, "seed", ("fake_stage", "a stand-in stage"))
    assert entry.main(["seed", "--x", "3"]) == 0
    assert depths == [(1, 3)]
    assert allocator._depth == 0 and _grows_mmapped_bytes()
