"""A layer's weight ready for both decode GEMVs: the tiled copy, the launch plans and the workspace.

:class:`GemvWeight` keeps ``W`` in :func:`~actsparse.kernels.sparse_gemv.tile_weight`'s layout once
and runs either kernel on it: the batched one (``__call__``, 1 to ``MAX_ROWS`` token rows,
:mod:`actsparse.kernels.sparse_gemv`) or the one-token one (:meth:`GemvWeight.one`,
:mod:`actsparse.kernels.gemv_one`). Both read the same workspace, shared by every weight of a
device and grown to fit the largest plan of either kernel.
"""

from __future__ import annotations

import torch

from actsparse.kernels.gemv_one import OnePlan, one_plan, one_workspace_sizes, sparse_gemv_one_auto
from actsparse.kernels.sparse_gemv import (
    MAX_ROWS,
    GemvPlan,
    Workspace,
    gemv_plan,
    shared_workspace_of,
    sm_count,
    sparse_gemv_auto,
    tile_weight,
    workspace_generation,
    workspace_sizes,
)


class GemvWeight:
    """A layer's weight in :func:`tile_weight`'s layout for the decode GEMVs, with its plans and workspace.

    ``weight`` ``[O, K]``; ``row_sum`` ``W 1`` (float32) when a shift is used. The column tile
    width is fixed per weight (``block_o``, else the batched kernel's default); the workspace is made on first use and
    reused: warm up once before CUDA-graph capture, and use one stream at a time per weight.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, row_sum: torch.Tensor | None = None,
                 block_o: int | None = None):  # fmt: skip
        self.out_features, self.in_features = weight.shape
        self.block_o = block_o or gemv_plan(self.in_features, self.out_features, 1, 1, 1).block_o
        self.tiled = tile_weight(weight, self.block_o)
        self.bias = None if bias is None else bias.detach()
        self.row_sum = None if row_sum is None else row_sum.detach().float()
        self.plans: dict[tuple[int, int, bool], GemvPlan] = {}  # per (rows, M, keyed)
        self.one_plans: dict[tuple[int, int, bool | None], OnePlan] = {}  # per (N, M, topk)
        self._need: dict[tuple[int, int], tuple[int, ...]] = {}  # workspace sizes per N:M, both kernels
        self._workspaces: dict[tuple[int, int], tuple[int, Workspace]] = {}  # per N:M: (generation, workspace)

    @property
    def device(self) -> torch.device:
        return self.tiled.device

    def plan(self, rows: int, m: int, keyed: bool = False) -> GemvPlan:
        """The batched kernel's plan for ``rows`` token rows (``keyed``: its integer-key ranking)."""
        key = (rows, m, keyed)
        if key not in self.plans:
            self.plans[key] = gemv_plan(self.in_features, self.out_features, m, rows, sm_count(self.device),
                                        block_o=self.block_o, keyed=keyed)  # fmt: skip
        return self.plans[key]

    def one_plan(self, n: int, m: int, topk: bool | None = None) -> OnePlan:
        """The one-token kernel's plan (``topk``: its top-N-keys selection, None: the module's default)."""
        key = (n, m, topk)
        if key not in self.one_plans:
            self.one_plans[key] = one_plan(self.in_features, self.out_features, n, m, self.block_o, sm_count(self.device),
                                           topk=topk)  # fmt: skip
        return self.one_plans[key]

    def workspace(self, n: int, m: int) -> Workspace:
        """The shared workspace (sizes computed once); fetched again only after some weight grew it."""
        key = (n, m)
        cached = self._workspaces.get(key)
        if cached is not None and cached[0] == workspace_generation():
            return cached[1]
        if key not in self._need:
            k, o = self.in_features, self.out_features
            sizes = [workspace_sizes(k, o, self.plan(rows, m)) for rows in range(1, MAX_ROWS + 1)]
            sizes.append(one_workspace_sizes(k, o, self.block_o, self.one_plan(n, m)))
            self._need[key] = tuple(max(column) for column in zip(*sizes))
        workspace = shared_workspace_of(self._need[key], self.device)
        self._workspaces[key] = (workspace_generation(), workspace)
        return workspace

    def __call__(
        self, x: torch.Tensor, n: int, m: int, *, vector=None, shift=None, var: bool = False, keyed: bool = False
    ) -> torch.Tensor:
        """The batched kernel on ``x`` ``[rows, K]``, 1 to ``MAX_ROWS`` rows."""
        ws, plan = self.workspace(n, m), self.plan(x.shape[0], m, keyed)
        # the op while torch.compile traces; its body directly otherwise (the op's dispatch costs host time)
        op = torch.ops.actsparse.sparse_gemv if torch.compiler.is_compiling() else sparse_gemv_auto
        return op(
            x.contiguous(), self.tiled, self.bias, self.row_sum, vector, shift, *ws, self.out_features, n, m, bool(var), *plan
        )

    def one(
        self, x: torch.Tensor, n: int, m: int, *, vector=None, shift=None, var: bool = False, topk: bool | None = None
    ) -> torch.Tensor:
        """The one-token kernel on ``x`` ``[1, K]`` (``topk`` as in :meth:`one_plan`)."""
        ws, plan = self.workspace(n, m), self.one_plan(n, m, topk)
        op = torch.ops.actsparse.sparse_gemv_one if torch.compiler.is_compiling() else sparse_gemv_one_auto
        return op(
            x.contiguous(),
            self.tiled,
            self.bias,
            self.row_sum,
            vector,
            shift,
            ws.partials,
            ws.stats,
            ws.counters,
            self.out_features,
            n,
            m,
            bool(var),
            *plan,
        )
