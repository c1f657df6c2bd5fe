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


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: the Triton paths under the interpreter


@pytest.mark.parametrize(
    "pattern, mitigation, rows, kernel",
    [("8:16", "none", 1, "gemv"), ("8:16", "var", 1, "gemv"), ("4:8", "dpts", 1, "gemv"), ("8:16", "var", 1, "gemv_one"),
     ("4:8", "dpts", 1, "gemv_one"), ("8:16", "var", 70, None), ("2:4", "none", 70, None)],
)  # fmt: skip
def test_fullgraph_compile_through_the_fast_paths(pattern, mitigation, rows, kernel, monkeypatch):
    """The Triton paths themselves (either decode GEMV for one row, sparsify + product, VAR's scale at
    the output from 64 rows, cuSPARSELt on CUDA when measured to win) trace without a graph break."""
    pytest.importorskip("triton")
    from actsparse.core import dispatch

    monkeypatch.setattr(
        dispatch.DecodeChoice, "default", staticmethod(lambda k, o, r, n, m: kernel if r == 1 else None)
    )  # tiny layers too
    monkeypatch.setattr(dispatch.PREFILL_CHOICE, "measured", {})
    monkeypatch.setattr(dispatch, "VAR_AT_OUTPUT_ROWS", 64)  # that path traced too
    model = tiny_model("llama").to(DEVICE)
    half = DEVICE == "cuda" and pattern == "2:4"  # cuSPARSELt takes 16-bit inputs; float32 elsewhere: exact masks
    if half:
        model = model.to(torch.bfloat16)
    sparsify_(model, SparsityConfig(pattern=pattern, criterion="amber", mitigation=mitigation, backend="triton"))
    for layer in model.modules():  # cuSPARSELt wherever it applies, so that it is traced too
        if type(layer).__name__ == "SparseLinear":
            for mode in ("eager", "graph"):
                dispatch.PREFILL_CHOICE.measured[(mode, rows, layer.in_features, layer.out_features)] = True
    ids = torch.randint(0, VOCAB, (1, rows), generator=torch.Generator().manual_seed(2)).to(DEVICE)
    torch._dynamo.reset()  # each case compiles the same code objects afresh: the whole recompile budget
    try:
        with torch.no_grad():
            eager = model(ids).logits.float()  # also makes the layers' weight copies and workspaces
            backend = "inductor" if DEVICE == "cuda" and not half else "aot_eager"  # bf16: no fusions, same rounding
            compiled = torch.compile(model, fullgraph=True, backend=backend)(ids).logits.float()
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(compiled, eager, atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the static-cache generate test runs the CUDA fast paths")
def test_generate_with_a_static_cache_on_cuda():
    model = preset_model("tiny-llama", torch.float32, torch.device("cuda"), seed=0)
    sparsify_(model, SparsityConfig(pattern="8:16", mitigation="var"))
    ids = torch.randint(0, model.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(3)).cuda()
    with torch.no_grad():
        static = model.generate(ids, max_new_tokens=8, do_sample=False, cache_implementation="static")
        dynamic = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert static.shape == (1, 20) and torch.equal(static, dynamic)
