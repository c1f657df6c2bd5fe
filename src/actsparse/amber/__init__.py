"""Amber Pruner in full (docs/methods.md, Amber Pruner): layer sensitivity, budgeted skipping, presets, prefill-only, W8A8 + sparsity.

- ``measure_sensitivity`` -> ``Sensitivity`` (``e_q`` per layer, text/PNG heat map, JSON dict)
- ``budget_skip`` / ``random_skip`` -> ``BudgetChoice`` (skip entries for ``SparsityConfig.skip``)
- ``allocate(model, config, calib_windows)``: N per layer under a density budget (``allocation="sensitivity"``;
  ``OBJECTIVES``: the ``e_q`` or the Fisher loss estimate, ``SparsityConfig.sensitivity``)
- ``amber_preset("llama3.1-8b")``: the Amber Pruner paper's published skip rule
- mitigations ``w8a8``, ``w8a8-smoothquant``, ``outstanding-sparse`` (registered on import)
- prefill-only mode: ``SparsityConfig(prefill_only=True)``
"""

from actsparse.amber import quant  # noqa: F401  (registers the W8A8 mitigations)
from actsparse.amber.allocation import OBJECTIVES, Allocation, Objective, allocate, choose_n, default_choices, density_of
from actsparse.amber.budget import (
    AMBER_PRESETS,
    BudgetChoice,
    amber_preset,
    amber_skip,
    budget_skip,
    flop_fraction,
    random_skip,
    skip_entries,
)
from actsparse.amber.quant import (
    QUANT_MITIGATIONS,
    fake_quant,
    outstanding_scale,
    quantize_activations,
    quantize_rest_,
    quantize_weight,
    smoothquant_scale,
)
from actsparse.amber.sensitivity import (
    LossTerms,
    Sensitivity,
    measure_curves,
    measure_fisher_curves,
    measure_loss_terms,
    measure_sensitivity,
    relative_error,
)

__all__ = [
    "Allocation", "allocate", "choose_n", "default_choices", "density_of", "measure_curves", "OBJECTIVES", "Objective",
    "LossTerms", "measure_fisher_curves", "measure_loss_terms",
    "AMBER_PRESETS", "QUANT_MITIGATIONS", "quantize_rest_", "BudgetChoice", "Sensitivity", "amber_preset", "amber_skip", "budget_skip", "fake_quant", "flop_fraction",
    "measure_sensitivity", "outstanding_scale", "quantize_activations", "quantize_weight", "random_skip", "relative_error",
    "skip_entries", "smoothquant_scale",
]  # fmt: skip
