"""Sparse models as ordinary Hugging Face checkpoints, through transformers' quantizer plugins.

``import actsparse`` registers the quantization method ``"actsparse"`` with transformers
(when ``transformers.quantizers`` is first imported, so that importing actsparse alone stays
quick). Then:

- ``model.save_pretrained(dir)`` on a model sparsified by ``sparsify_``, calibrated by
  ``calibrate_`` or loaded by ``load_state_`` writes the ordinary weights, a
  ``quantization_config`` (``quant_method: "actsparse"``, the full ``SparsityConfig``, the
  calibration record, the versions) in ``config.json``, and the mitigation state (and the
  calibration statistics of dynamic criteria such as clact) in the same safetensors files,
  under keys starting with ``actsparse.``;
- ``AutoModelForCausalLM.from_pretrained(dir)`` loads the dense weights and sparsifies the
  model again with the saved config and tensors: the same sparse model, the same logits;
- ``from_pretrained(dense_dir, quantization_config=ActsparseConfig(pattern="8:16", ...))``
  sparsifies a dense checkpoint on load (dynamic criteria and mitigations).
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys

from actsparse.sparsify import add_model_hook

QUANT_METHOD = "actsparse"
STATE_PREFIX = "actsparse."  # key prefix of actsparse's tensors in a checkpoint's safetensors
_HOOKED_MODULE = "transformers.quantizers.auto"


def register() -> None:
    """Register ``ActsparseConfig`` / ``ActsparseHfQuantizer`` with transformers (idempotent)."""
    module = sys.modules.get("actsparse.hf.quantizer")
    if module is not None and not hasattr(module, "register"):
        return  # being imported right now (it imports transformers.quantizers); it registers itself at its end
    from actsparse.hf.quantizer import register as _register

    _register()


class _RegisterAfterImport(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Registers actsparse right after ``transformers.quantizers.auto`` has been executed."""

    def find_spec(self, fullname, path, target=None):
        if fullname != _HOOKED_MODULE:
            return None
        sys.meta_path.remove(self)  # once; and so that the real spec is found below
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        self._loader = spec.loader
        spec.loader = self
        return spec

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        register()


def install_hook() -> None:
    if _HOOKED_MODULE in sys.modules:
        register()
    elif not any(isinstance(finder, _RegisterAfterImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterImport())


def attach_(model) -> None:
    """Give a transformers model sparsified in place the actsparse quantizer, so that
    ``save_pretrained`` writes an actsparse checkpoint (a no-op for other modules)."""
    if not (hasattr(model, "save_pretrained") and hasattr(model, "config")):
        return
    from actsparse.hf.quantizer import ActsparseConfig, ActsparseHfQuantizer

    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and not isinstance(quantizer, ActsparseHfQuantizer):
        return  # another method's model (e.g. GGUF-loaded): leave it alone
    if quantizer is None:
        quantizer = ActsparseHfQuantizer(ActsparseConfig(), pre_quantized=False)
        model.hf_quantizer = quantizer
    quantizer.refresh(model)


def detach_(model) -> None:
    """Undo ``attach_`` (``unsparsify_`` calls it): the model saves as a dense checkpoint again."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None or getattr(quantizer.quantization_config, "quant_method", None) != QUANT_METHOD:
        return
    model.hf_quantizer = None
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "quantization_config"):
        del config.quantization_config
    if config is not None and getattr(config, "_is_quantized", False):
        config._is_quantized = False
    for attr in ("is_quantized", "quantization_method"):
        if attr in vars(model):
            delattr(model, attr)


add_model_hook(attach_, detach_)  # sparsify_ / unsparsify_ give transformers models the quantizer and take it back
