"""What a run measures besides perplexity: lm-eval tasks and the generation check, as an ``extra``.

``Evaluator.run*(..., extra=measure(prepared, generate))`` calls it while the model is sparse
(pruned, calibrated), so the tasks and the continuations see exactly that model.
"""

from __future__ import annotations

from actsparse.eval.generate import greedy_continuations
from actsparse.eval.lmeval import evaluate_tasks


def measure(prepared=None, generate=None):
    """``(model, tokenizer) -> {"tasks", "lm_eval", "generation"}`` for ``PreparedTasks`` and ``GenerateSettings``; None if neither."""
    if (prepared is None or not prepared.names) and generate is None:
        return None

    def extra(model, tokenizer) -> dict:
        out = {}
        if prepared is not None and prepared.names:
            out.update(evaluate_tasks(model, tokenizer, prepared))
        if generate is not None:
            out["generation"] = {"settings": generate.to_dict(), "outputs": greedy_continuations(model, tokenizer, generate)}
        return out

    return extra
