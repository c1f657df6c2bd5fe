"""A sparsified HF model under torch.compile(fullgraph=True) and CUDA-graph capture.

On the CPU the sparse layers take the PyTorch reference; on CUDA the decode step runs the
Triton fast path (``torch.ops.actsparse.sparse_gemv``) inside a captured graph.
"""

import pytest
import torch

from actsparse import SparsityConfig, sparsify_
from actsparse.eval.speed import Decoder, capture_graph, preset_model
from conftest import VOCAB, tiny_model


@pytest.mark.parametrize("mitigation", ["none", "var", "dpts"])
def test_fullgraph_compile_of_a_sparsified_model_matches_eager(mitigation):
    model = tiny_model("llama")
    sparsify_(model, SparsityConfig(pattern="8:16", criterion="amber", mitigation=mitigation))
    ids = torch.randint(0, VOCAB, (1, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        eager = model(ids).logits
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")(ids).logits
    assert torch.equal(compiled, eager)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA-graph capture needs a GPU")
def test_decode_step_replays_as_a_cuda_graph():
    model = preset_model("tiny-llama", torch.bfloat16, torch.device("cuda"), seed=0)
    sparsify_(model, SparsityConfig(pattern="8:16"))
    generator = torch.Generator().manual_seed(0)
    decoder = Decoder(model, batch=1, prompt=8, steps=4, generator=generator)
    decoder.start()
    for _ in range(4):
        decoder.step()
    eager_tokens = decoder.token.clone()
    decoder.start()
    graph = capture_graph(decoder.step)  # two warm-up steps, then the capture
    decoder.start()
    for _ in range(4):
        graph.replay()
    assert torch.equal(decoder.token, eager_tokens)
