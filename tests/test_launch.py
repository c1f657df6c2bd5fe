"""The direct relaunch of compiled Triton kernels: same key as Triton's specialisation, same results."""

import pytest
import torch

triton = pytest.importorskip("triton")

from actsparse.kernels.launch import Launcher, specialization_key  # noqa: E402


def test_the_key_changes_exactly_where_triton_specialises():
    base = torch.zeros(64, dtype=torch.bfloat16)
    aligned, shifted = base[8:], base[1:]  # 16 bytes in; 2 bytes in
    assert specialization_key((base, 7), {"N": 2}) == specialization_key((aligned, 9), {"N": 2})
    assert specialization_key((base,), {}) != specialization_key((shifted,), {})  # alignment
    assert specialization_key((base,), {}) != specialization_key((base.float(),), {})  # dtype
    assert specialization_key((1,), {}) != specialization_key((2,), {})  # == 1
    assert specialization_key((32,), {}) != specialization_key((33,), {})  # multiple of 16
    assert specialization_key((33,), {}) == specialization_key((35,), {})
    assert specialization_key((base,), {"N": 2}) != specialization_key((base,), {"N": 4})  # constexprs
    assert specialization_key((base,), {"num_warps": 4}) != specialization_key((base,), {"num_warps": 8})


if triton is not None:
    import triton.language as tl

    @triton.jit
    def _scale_kernel(x_ptr, y_ptr, n, FACTOR: tl.constexpr, BLOCK: tl.constexpr, OFFSET: tl.constexpr = 0):
        at = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = at < n
        tl.store(y_ptr + at, tl.load(x_ptr + at, mask=ok) * FACTOR + OFFSET, mask=ok)


def _launch(launcher, x, factor=2):
    y = torch.empty_like(x)
    launcher((triton.cdiv(x.numel(), 128),), x, y, x.numel(), FACTOR=factor, BLOCK=128, num_warps=4)
    return y


def test_the_interpreter_and_cpu_tensors_take_tritons_own_launch():
    launcher = Launcher(_scale_kernel)
    x = torch.arange(300, dtype=torch.float32)
    if x.is_cuda or not _interpreting():
        pytest.skip("needs the CPU interpreter")
    assert torch.equal(_launch(launcher, x), x * 2)
    assert launcher.compiled == {}  # nothing kept: there is no compiled kernel to relaunch


def _interpreting():
    import os

    return os.environ.get("TRITON_INTERPRET") == "1"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="relaunching compiled kernels needs CUDA")
def test_relaunched_kernels_match_tritons_launch_for_every_key():
    launcher = Launcher(_scale_kernel)
    base = torch.randn(4096, device="cuda")
    for x in (base, base[1:], base[:1000], base[4:].clone(), base[:1]):
        for factor in (2, 3):
            first = _launch(launcher, x, factor)  # a new key: Triton's launch, compiled kernel kept
            again = _launch(launcher, x, factor)  # the direct relaunch
            assert torch.equal(first, x * factor) and torch.equal(again, first)
    assert len(launcher.compiled) >= 5
    graph = torch.cuda.CUDAGraph()
    y = torch.empty_like(base)
    with torch.cuda.graph(graph):
        launcher((triton.cdiv(base.numel(), 128),), base, y, base.numel(), FACTOR=2, BLOCK=128, num_warps=4)
    base.copy_(torch.randn(4096, device="cuda"))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(y, base * 2)


def test_an_empty_hook_chain_is_not_called_but_a_hook_is():
    from actsparse.kernels.launch import _hook

    class Chain:
        def __init__(self, calls):
            self.calls = calls

    assert _hook(None) is None and _hook(Chain([])) is None
    chain, plain = Chain([print]), print
    assert _hook(chain) is chain and _hook(plain) is plain
