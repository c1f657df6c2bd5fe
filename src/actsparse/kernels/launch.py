"""Launch a compiled Triton kernel again without Triton's per-call argument binding.

``kernel[grid](*args, **constexprs)`` binds and specialises every argument, builds the cache
key and checks the kernel's globals on each call: host time that an eager decode step (one
launch per layer, a few microseconds of GPU work each) cannot hide. :class:`Launcher` keeps,
per key of what Triton specialises on, the compiled kernel that the first such call produced,
and launches it directly afterwards.

The key is what Triton 3's specialisation reads from the arguments: each tensor's dtype and
whether its address is a multiple of 16 bytes, each integer's being 1 or a multiple of 16, and
every constexpr and option value. A call whose key is new goes through ``kernel[grid]`` (and
compiles if needed); so do calls under the interpreter and with a Triton whose compiled kernels
lack the fields used here. Launch hooks (profilers) are called as Triton calls them.
"""

from __future__ import annotations

import torch

try:
    from triton import knobs
except ImportError:  # the module imports without Triton
    knobs = None

ALIGN = 16  # bytes: Triton marks pointers divisible by this
ENABLED = True  # False: every call through kernel[grid] (benchmarks compare the two)


def _arg_key(arg) -> object:
    if isinstance(arg, torch.Tensor):
        return (arg.dtype, arg.data_ptr() % ALIGN == 0)
    if isinstance(arg, bool) or not isinstance(arg, int):
        return arg
    return (arg == 1, arg % 16 == 0)


def specialization_key(args: tuple, constexprs: dict) -> tuple:
    """What Triton would compile a different kernel for (see the module docstring)."""
    return tuple(_arg_key(arg) for arg in args) + tuple(constexprs.items())


def _hook(hook):
    """A launch hook to call, or None: Triton's default is an empty chain of hooks, which its own
    launch still builds the launch metadata for and calls on every launch."""
    return None if hook is None or not getattr(hook, "calls", True) else hook


def _launchable(compiled) -> bool:
    return all(hasattr(compiled, name) for name in ("run", "function", "packed_metadata", "_init_handles"))


class Launcher:
    """``Launcher(jit_fn)(grid, *args, **constexprs_and_options)``: the same as ``jit_fn[grid](...)``.

    ``args`` are the kernel's leading runtime parameters in signature order; every later
    parameter (the constexprs) and the launch options (``num_warps``, ``num_stages``) are keywords.
    """

    def __init__(self, fn):
        self.fn = fn
        self.params = tuple(getattr(fn, "params", ()))  # none under the interpreter (never used there)
        self.compiled: dict[tuple, tuple] = {}  # key -> (compiled kernel, later parameters' values in signature order)

    def __call__(self, grid: tuple[int, ...], *args, **meta):
        first = args[0]
        if not ENABLED or not first.is_cuda:
            return self.fn[grid](*args, **meta)
        key = (first.device.index, len(grid), *specialization_key(args, meta))
        hit = self.compiled.get(key)
        if hit is None:
            compiled = self.fn[grid](*args, **meta)
            if _launchable(compiled):
                compiled._init_handles()
                later = self.params[len(args) :]
                rest = tuple(meta[p.name] if p.name in meta else p.default for p in later)
                self.compiled[key] = (compiled, rest)
            return compiled
        compiled, rest = hit
        stream = torch._C._cuda_getCurrentRawStream(first.device.index)  # what Triton's own launch reads
        enter = _hook(knobs.runtime.launch_enter_hook)  # a profiler's hooks see the launch as they would Triton's
        metadata = None if enter is None else compiled.launch_metadata(grid, stream, *args, *rest)
        size = (*grid, 1, 1)
        compiled.run(size[0], size[1], size[2], stream, compiled.function, compiled.packed_metadata, metadata,
                     enter, _hook(knobs.runtime.launch_exit_hook), *args, *rest)  # fmt: skip
        return compiled
