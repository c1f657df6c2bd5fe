"""actsparse: post-training N:M activation sparsity for Hugging Face causal LMs.

import actsparse
model, tokenizer = actsparse.load_model("smollm2-135m")
report = actsparse.sparsify_(model, actsparse.SparsityConfig(pattern="8:16", criterion="amber", mitigation="var"))
print(report.sparse_flop_fraction)
actsparse.unsparsify_(model)
"""

from actsparse._version import __version__ as __version__
from actsparse.amber import Allocation, allocate, amber_preset, budget_skip, measure_sensitivity, random_skip  # registers w8a8
from actsparse.baselines import WeightPruneConfig, WeightPruneReport, load_pruned_, prune_weights_, save_pruned, verify_pattern
from actsparse.calibration.collect import collect_input_stats
from actsparse.calibration.layerwise import CalibrationOptions, CalibrationReport, calibrate_, collect_covariance_stats
from actsparse.calibration.mitigations import CovarianceStats, ensure_mitigation  # registers the calibrated mitigations
from actsparse.calibration.state import load_state_, save_state
from actsparse.config import SparsityConfig
from actsparse.core.mitigation import MITIGATIONS, Mitigation, register_mitigation
from actsparse.core.patterns import NM, Dense, Unstructured, parse_pattern
from actsparse.core.scoring import CRITERIA, Criterion, register_criterion
from actsparse.core.sparse_linear import SparseLinear
from actsparse.core.stats import InputStats
from actsparse.core.tuning import tune_
from actsparse.errors import ActsparseError
from actsparse.hf import install_hook as _install_hf_hook
from actsparse.models import loading as _loading
from actsparse.models.discovery import find_linear_sites
from actsparse.sparsify import SparsifyReport, sparsify_, unsparsify_

_install_hf_hook()  # `quant_method: "actsparse"` checkpoints load with AutoModelForCausalLM.from_pretrained


def load_model(name: str, dtype: str = "float32", device: str = "cpu", **placement):
    """Load an alias (smollm2-135m, gemma3-270m), a local directory or a hub id: ``(model, tokenizer)``.

    ``device_map="auto"`` (and ``max_memory``, ``offload_folder``) spreads it over several
    devices, the CPU and disk with accelerate."""
    return _loading.load_model(name, dtype=dtype, device=device, **placement)


__all__ = [
    "ActsparseError", "CRITERIA", "Criterion", "Dense", "InputStats", "MITIGATIONS", "Mitigation", "NM",
    "SparseLinear", "SparsifyReport", "SparsityConfig", "Unstructured", "collect_input_stats", "find_linear_sites",
    "load_model", "parse_pattern", "register_criterion", "register_mitigation", "sparsify_", "tune_", "unsparsify_",
    "WeightPruneConfig", "WeightPruneReport", "load_pruned_", "prune_weights_", "save_pruned", "verify_pattern",
    "Allocation", "allocate", "amber_preset", "budget_skip", "measure_sensitivity", "random_skip",
    "CalibrationOptions", "CalibrationReport", "CovarianceStats", "calibrate_", "collect_covariance_stats", "ensure_mitigation", "load_state_", "save_state",
]  # fmt: skip
