import math

import pytest
import torch
import torch.nn.functional as F

from actsparse import ActsparseError, SparsityConfig
from actsparse.eval.perplexity import make_windows, perplexity
from conftest import VOCAB, tiny_model


def test_windows_are_non_overlapping_and_drop_the_partial_tail():
    tokens = torch.arange(25)
    windows = make_windows(tokens, 8)
    assert windows.tolist() == [list(range(0, 8)), list(range(8, 16)), list(range(16, 24))]
    assert make_windows(tokens, 8, max_tokens=17).shape == (2, 8)
    with pytest.raises(ActsparseError, match="--max-tokens"):
        make_windows(tokens, 8, max_tokens=7)
    with pytest.raises(ActsparseError, match="seqlen"):
        make_windows(tokens, 30)


def manual_ppl(model, windows, bos_id):
    nll, count = 0.0, 0
    for window in windows:
        ids = window if bos_id is None else torch.cat([torch.tensor([bos_id]), window])
        with torch.no_grad():
            logits = model(ids[None]).logits[0]
        for position in range(1, len(ids)):
            nll -= F.log_softmax(logits[position - 1].double(), -1)[ids[position]].item()
            count += 1
    return math.exp(nll / count), count


@pytest.mark.parametrize("bos_id", [None, 1])
def test_perplexity_is_the_mean_nll_over_predicted_tokens(bos_id):
    model = tiny_model("llama")
    windows = torch.randint(2, VOCAB, (3, 10), generator=torch.Generator().manual_seed(0))
    result = perplexity(model, windows, bos_id=bos_id, progress=False)
    expected, count = manual_ppl(model, windows, bos_id)
    assert result.predicted_tokens == count == (30 if bos_id is not None else 27)
    assert result.ppl == pytest.approx(expected, rel=1e-5)
    batched = perplexity(model, windows, bos_id=bos_id, batch_size=2, progress=False)
    assert batched.ppl == pytest.approx(result.ppl, rel=1e-5)


def test_same_config_gives_the_same_number(tiny_dir):
    from actsparse.eval.run import EvalSettings, Evaluator

    settings = EvalSettings(model=str(tiny_dir), data=str(tiny_dir / "text.txt"), seqlen=16, device="cpu")
    config = SparsityConfig(pattern="8:16", criterion="amber", mitigation="var")
    first = Evaluator(settings, progress=False).run(config)
    second = Evaluator(settings, progress=False).run(config)
    assert first["sparse_ppl"] == second["sparse_ppl"]
    assert first["dense_ppl"] == second["dense_ppl"]
    assert first["sparse_ppl"] != first["dense_ppl"]
    assert first["bos"] is True and first["tokens"] == first["windows"] * 16
