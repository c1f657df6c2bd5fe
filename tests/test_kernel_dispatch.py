"""The sparse linear layer's Triton path gives the reference's results (CPU: Triton interpreter)."""

import pytest
import torch

pytest.importorskip("triton")

from actsparse import ActsparseError, SparsityConfig, sparsify_, unsparsify_  # noqa: E402
from actsparse.core.dispatch import choose_backend, unsupported_reason  # noqa: E402
from actsparse.core.patterns import NM, Unstructured  # noqa: E402
from conftest import VOCAB, tiny_model  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def logits(model, length):
    ids = torch.randint(0, VOCAB, (1, length), generator=torch.Generator().manual_seed(length)).to(DEVICE)
    with torch.no_grad():
        return model(ids).logits.float()


@pytest.mark.parametrize(
    "pattern, criterion, mitigation", [("2:4", "magnitude", "none"), ("8:16", "amber", "var"), ("4:8", "wina", "dpts")]
)
@pytest.mark.parametrize("length", [2, 24])  # 2 rows: decode GEMV path; 24 rows: sparsify + dense product
def test_triton_backend_matches_the_reference_in_a_model(pattern, criterion, mitigation, length, monkeypatch):
    from actsparse.core.dispatch import DecodeChoice
    from actsparse.kernels.gemv_weight import GemvWeight

    # the tiny model's layers are narrower than the default rule's 2048 outputs: take the GEMV anyway
    monkeypatch.setattr(DecodeChoice, "default", staticmethod(lambda k, o, rows, n, m: "gemv" if rows <= 2 else None))
    gemv_calls = []
    real_gemv = GemvWeight.__call__
    monkeypatch.setattr(GemvWeight, "__call__", lambda *a, **k: gemv_calls.append(1) or real_gemv(*a, **k))
    model = tiny_model("llama").to(DEVICE)
    results = {}
    for backend in ("torch", "triton"):
        report = sparsify_(model, SparsityConfig(pattern=pattern, criterion=criterion, mitigation=mitigation, backend=backend))
        layers = [m for m in model.modules() if type(m).__name__ == "SparseLinear"]
        assert {layer.backend for layer in layers} == {backend} and report.sparse
        results[backend] = logits(model, length)
        unsparsify_(model)
    assert bool(gemv_calls) == (length <= 2)  # the decode GEMV serves exactly the few-row calls
    reference, fast = results["torch"], results["triton"]
    assert torch.allclose(fast, reference, atol=1e-4, rtol=1e-4), (fast - reference).abs().max()


def test_forcing_triton_on_an_unsupported_config_is_refused():
    model = tiny_model("llama")
    with pytest.raises(ActsparseError, match="backend 'triton' has no kernel"):
        sparsify_(model, SparsityConfig(pattern="unstructured:0.5", backend="triton"))
    with pytest.raises(ActsparseError, match="unknown backend"):
        SparsityConfig(backend="cuda")


def test_auto_falls_back_to_the_reference_where_no_kernel_fits():
    assert choose_backend("auto", Unstructured(0.5), "magnitude", "none") == "torch"
    assert choose_backend("auto", NM(2, 4), "random", "none") == "torch"
    assert choose_backend("auto", NM(2, 4), "amber", "smooth") == "torch"
    assert choose_backend("auto", NM(16, 64), "amber", "none") == "torch"
    assert choose_backend("auto", NM(8, 16), "clact", "var") == "triton"
    assert unsupported_reason(NM(2, 4), "magnitude", "none") is None


def test_auto_on_cpu_uses_the_reference_even_under_the_interpreter():
    model = tiny_model("llama")
    sparsify_(model, SparsityConfig(pattern="2:4", backend="auto"))
    layer = model.model.layers[0].mlp.down_proj
    assert layer.backend == "triton" and not layer.forced_backend
    if DEVICE == "cpu":
        called = []
        import actsparse.core.sparse_linear as sl

        original = sl.triton_forward
        sl.triton_forward = lambda *a: called.append(1) or original(*a)
        try:
            logits(model, 4)
        finally:
            sl.triton_forward = original
        assert not called


def test_decode_choice_default_rule_and_measured_entries():
    from actsparse.core.dispatch import DecodeChoice

    choice = DecodeChoice()
    assert choice.sparse_wins(4096, 14336, 1, 8, 16, torch.bfloat16)
    assert not choice.sparse_wins(4096, 14336, 2, 8, 16, torch.bfloat16)  # two tokens: union of kept rows
    assert not choice.sparse_wins(4096, 1024, 1, 8, 16, torch.bfloat16)  # narrow k/v projections
    assert not choice.sparse_wins(4096, 14336, 1, 12, 16, torch.bfloat16)  # density above 1/2
    assert not choice.sparse_wins(4096, 14336, 5, 8, 16, torch.bfloat16)  # beyond the kernel's rows
    choice.measured[(4096, 1024, 1, 8, 16, torch.bfloat16, 1)] = "gemv"
    assert choice.sparse_wins(4096, 1024, 1, 8, 16, torch.bfloat16)
    choice.measured[(4096, 6144, 1, 8, 16, torch.bfloat16, 3)] = None  # q/k/v side by side: its own entry
    assert not choice.sparse_wins(4096, 6144, 1, 8, 16, torch.bfloat16, layers=3)
    assert choice.sparse_wins(4096, 6144, 1, 8, 16, torch.bfloat16)  # a single layer of that shape: the rule


@pytest.mark.parametrize(
    "k, o, n, m, kernel",
    [
        (4096, 28672, 2, 4, "gemv_one"),  # 2:4: the one-token kernel on every Llama shape
        (14336, 4096, 2, 4, "gemv_one"),
        (4096, 6144, 2, 4, "gemv_one"),
        (4096, 4096, 1, 4, "gemv_one"),  # M <= 4: its ranking in each step is cheap
        (14336, 4096, 8, 16, "gemv"),  # 8:16: the batched kernel (the one-token one won nowhere by 2%)
        (4096, 28672, 8, 16, "gemv"),
        (14336, 4096, 16, 32, "gemv"),
    ],
)
def test_the_default_rule_names_the_kernel_the_h200_measured_faster(k, o, n, m, kernel):
    from actsparse.core.dispatch import DECODE_KERNELS, DecodeChoice

    choice = DecodeChoice()
    assert choice.kernel(k, o, 1, n, m, torch.bfloat16) is DECODE_KERNELS[kernel]
    assert choice.kernel(k, o, 2, n, m, torch.bfloat16) is None
    assert choice.block_o(k, o, n, m) == DECODE_KERNELS[kernel].block_o(
        k, o
    )  # the weight copy's tiles: its kernel's  # one-token kernels never take two rows
    choice.measured[(k, o, 2, n, m, torch.bfloat16, 1)] = "gemv_one"  # an entry cannot send two rows there either
    assert choice.kernel(k, o, 2, n, m, torch.bfloat16) is None
    assert choice.block_o(k, o, n, m) == DECODE_KERNELS[kernel].block_o(k, o)  # the weight copy's tiles: its kernel's


def test_prefill_choice_reads_the_measured_table_and_defaults_to_dense():
    from actsparse.core.dispatch import PrefillChoice

    choice = PrefillChoice()
    assert not choice.sparse_wins("eager", 8192, 4096, 14336)  # nothing measured: the dense product
    choice.measured[("graph", 2048, 4096, 14336)] = True
    choice.measured[("graph", 512, 4096, 14336)] = False
    assert choice.sparse_wins("graph", 2048, 4096, 14336)
    assert choice.sparse_wins("graph", 8192, 4096, 14336)  # nearest measured rows below: 2048
    assert not choice.sparse_wins("graph", 1024, 4096, 14336)  # nearest below: 512
    assert not choice.sparse_wins("graph", 256, 4096, 14336)  # below every measured row count
    assert not choice.sparse_wins("eager", 8192, 4096, 14336)  # kept per mode
    assert not choice.sparse_wins("graph", 8192, 4096, 4096)  # and per shape


def test_forward_never_times_anything(monkeypatch):
    """The choice between fast paths is looked up; nothing in a forward pass creates CUDA events or times."""
    import actsparse.timing

    def refuse(*a, **k):
        raise AssertionError("forward timed something")

    monkeypatch.setattr(actsparse.timing.Timer, "__call__", refuse)
    monkeypatch.setattr(torch.cuda, "Event", refuse)
    model = tiny_model("llama").to(DEVICE)
    sparsify_(model, SparsityConfig(pattern="2:4", backend="triton"))
    assert torch.isfinite(logits(model, 70)).all()


@pytest.mark.parametrize("criterion", ["magnitude", "amber"])
def test_var_scale_at_the_output_matches_the_reference_in_a_model(criterion, monkeypatch):
    """With VAR_AT_OUTPUT_ROWS set, VAR's scale multiplies the product's output, not the input (off by
    default: measured slower on the H200)."""
    from actsparse.core import dispatch
    from actsparse.kernels import sparsify as kernels

    monkeypatch.setattr(dispatch, "VAR_AT_OUTPUT_ROWS", 64)
    calls = []
    real = kernels.nm_sparsify_var_scale
    monkeypatch.setattr(kernels, "nm_sparsify_var_scale", lambda *a, **k: calls.append(1) or real(*a, **k))
    length = 70
    model = tiny_model("llama").to(DEVICE)
    results = {}
    for backend in ("torch", "triton"):
        sparsify_(model, SparsityConfig(pattern="8:16", criterion=criterion, mitigation="var", backend=backend))
        results[backend] = logits(model, length)
        unsparsify_(model)
    assert calls  # the output-scale path ran
    torch.testing.assert_close(results["triton"], results["torch"], atol=1e-4, rtol=1e-4)
