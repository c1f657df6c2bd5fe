"""Weight pruning baselines at the same sparsity patterns as activation sparsity.

    import actsparse
    config = actsparse.WeightPruneConfig(pattern="2:4", method="sparsegpt")
    report = actsparse.prune_weights_(model, config, calib_windows)   # [n, seqlen] ids of calibration text
    actsparse.verify_pattern(model)                                     # raises if any pruned layer breaks 2:4
    actsparse.save_pruned(model, "pruned/")                             # safetensors + JSON
    actsparse.load_pruned_(fresh_model, "pruned/")                      # the same pruned model again

Methods (``PRUNERS``; a new one is a function plus one ``register_pruner`` line):
``magnitude`` (|W|), ``wanda`` (|W|·||X_j||) and ``sparsegpt`` (OBS with weight update). N is
always the number of weights KEPT per group of M consecutive input columns of a row.
Pruning is sequential: every decoder layer is calibrated on the outputs of the already
pruned layers before it (see :mod:`actsparse.baselines.prune`).
"""

from actsparse.baselines.config import WeightPruneConfig
from actsparse.baselines.io import load_pruned_, save_pruned
from actsparse.baselines.methods import PRUNERS, LayerInputs, Pruner, get_pruner, prune_matrix, register_pruner
from actsparse.baselines.prune import (
    WeightPruneReport,
    capture_layer_inputs,
    prune_weights_,
    restore_weights_,
    snapshot_weights,
)
from actsparse.baselines.verify import check_weight, verify_pattern

__all__ = [
    "LayerInputs", "PRUNERS", "Pruner", "WeightPruneConfig", "WeightPruneReport", "capture_layer_inputs", "check_weight",
    "get_pruner", "load_pruned_", "prune_matrix", "prune_weights_", "register_pruner", "restore_weights_", "save_pruned",
    "snapshot_weights", "verify_pattern",
]  # fmt: skip
