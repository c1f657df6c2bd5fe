"""``actsparse bench`` on the CPU: a tiny random-weight model, dense vs sparse, table and JSON."""

import json

import pytest
import torch

from actsparse.cli.main import main
from actsparse.config import SparsityConfig
from actsparse.eval.speed import BenchOptions, check_fast_path, preset_model, run_bench
from actsparse.sparsify import sparsify_, unsparsify_


def test_bench_command_writes_every_measurement(tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = main(
        [
            "bench",
            "--model",
            "tiny-llama",
            "--device",
            "cpu",
            "--dtype",
            "float32",
            "--prefill",
            "8,16",
            "--batch",
            "1,2",
            "--prompt",
            "4",
            "--steps",
            "2",
            "--repeats",
            "1",
            "--json",
            str(out),
        ]
    )
    assert rc == 0
    record = json.loads(out.read_text())
    got = {(m["phase"], m["mode"], m["size"]) for m in record["measurements"]}
    assert got == {("prefill", "eager", 8), ("prefill", "eager", 16), ("decode", "eager", 1), ("decode", "eager", 2)}
    for m in record["measurements"]:
        assert m["dense"] > 0 and m["sparse"] > 0 and m["speedup"] > 0
    assert record["config"]["pattern"] == "8:16" and record["versions"]["torch"] == torch.__version__
    assert record["skipped"] == ["graph mode: needs CUDA"]
    assert record["checks"]["sparse_flop_fraction"] > 0.9
    assert record["options"]["steps"] == 2 and record["options"]["prefill"] == [8, 16] and record["options"]["pdl"] is False
    table = capsys.readouterr().out
    assert "decode" in table and "speedup" in table


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--batch", "0"], "positive integers"),
        (["--prefill", "abc"], "positive integers"),
        (["--modes", "fast"], "unknown mode"),
        (["--steps", "-1"], "positive integer"),
        (["--pattern", "2:5"], None),
    ],
)
def test_bad_bench_options_are_one_line_errors(argv, message, capsys):
    rc = main(
        [
            "bench",
            "--model",
            "tiny-llama",
            "--device",
            "cpu",
            "--steps",
            "1",
            "--repeats",
            "1",
            "--prefill",
            "4",
            "--batch",
            "1",
            *argv,
        ]
    )
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1
    if message:
        assert message in err


def test_same_inputs_and_config_give_the_same_sparse_logits():
    model = preset_model("tiny-llama", torch.float32, torch.device("cpu"), seed=3)
    ids = torch.randint(0, model.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    sparsify_(model, SparsityConfig(pattern="2:4"))
    with torch.no_grad():
        first, again = model(ids).logits, model(ids).logits
    assert torch.equal(first, again)


def test_fast_path_check_compares_the_kernels_with_the_reference(monkeypatch):
    """Under the Triton interpreter with backend=triton, the check really runs both paths."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    model = preset_model("tiny-llama", torch.float32, torch.device("cpu"), layers=1)
    config = SparsityConfig(pattern="8:16", criterion="amber", mitigation="var", backend="triton")
    sparsify_(model, config)
    checks = check_fast_path(model, config, torch.Generator().manual_seed(0))
    assert checks["layers_checked"] >= 3 and set(checks["layer_rel_err"]) == {1, 2, 16}
    assert max(checks["layer_rel_err"].values()) < 1e-4


def test_pdl_is_set_for_the_run_only_and_recorded(monkeypatch):
    """bench --pdl: inductor's and the one-token GEMV's programmatic dependent launch are on during the
    run (and new one-token plans take it), then back as they were."""
    from torch._inductor import config as inductor_config

    from actsparse.eval import speed
    from actsparse.kernels import gemv_one

    seen = {}

    def fake_run(model, name, config, options):
        seen["flags"] = (inductor_config.triton.enable_pdl, gemv_one.PDL, gemv_one.one_plan(64, 64, 2, 4, 64, 4).pdl)
        return speed.BenchResult(model=name, config={}, device="cpu", versions={}, options={"pdl": options.pdl})

    monkeypatch.setattr(speed, "_run_bench", fake_run)
    before = (inductor_config.triton.enable_pdl, gemv_one.PDL)
    rc = main(["bench", "--model", "tiny-llama", "--device", "cpu", "--prefill", "8", "--batch", "none", "--pdl"])
    assert rc == 0
    assert seen["flags"] == (True, True, True)
    assert (inductor_config.triton.enable_pdl, gemv_one.PDL) == before == (False, False)


def test_run_bench_leaves_the_model_dense():
    model = preset_model("tiny-llama", torch.float32, torch.device("cpu"), layers=1)
    result = run_bench(
        model,
        "tiny-llama",
        SparsityConfig(pattern="2:4"),
        BenchOptions(prefill=(8,), batches=(1,), prompt=4, steps=2, repeats=1, warmup=1),
    )
    assert [m.phase for m in result.measurements] == ["prefill", "decode"]
    assert not any(type(m).__name__ == "SparseLinear" for m in model.modules())


def test_the_sparse_gemv_op_compiles_without_graph_breaks():
    from actsparse.kernels.gemv_weight import GemvWeight
    from actsparse.kernels.sparse_gemv import sparse_gemv_reference

    weight = torch.randn(24, 32)
    gw = GemvWeight(weight, torch.randn(24))
    compiled = torch.compile(lambda x: gw(x, 2, 4, var=True), fullgraph=True, backend="aot_eager")
    x = torch.randn(1, 32)
    expected = sparse_gemv_reference(x, weight, 2, 4, var=True, bias=gw.bias)
    assert torch.allclose(compiled(x), expected, atol=1e-5)


def _greedy_tokens(model, forward, steps=4):
    from actsparse.eval.speed import Decoder

    decoder = Decoder(model, 2, 5, steps, torch.Generator().manual_seed(7), forward=forward)
    decoder.start()
    tokens = [decoder.token.clone()]
    for _ in range(steps):
        decoder.step()
        tokens.append(decoder.token.clone())
    return torch.cat(tokens, dim=1)


def test_compile_mode_decodes_the_same_tokens_as_eager_and_is_benched():
    from actsparse.eval.speed import compiled

    torch._dynamo.reset()
    model = preset_model("tiny-llama", torch.float32, torch.device("cpu"), layers=1, seed=5)
    sparsify_(model, SparsityConfig(pattern="2:4"))
    options = BenchOptions(compile_backend="aot_eager")
    eager = _greedy_tokens(model, model)
    with torch.no_grad():
        assert torch.equal(_greedy_tokens(model, compiled(model, options)), eager)
    unsparsify_(model)
    result = run_bench(
        model,
        "tiny-llama",
        SparsityConfig(pattern="2:4"),
        BenchOptions(prefill=(8,), batches=(1,), prompt=4, steps=2, repeats=1, modes=("compile",), compile_backend="aot_eager"),
    )
    torch._dynamo.reset()
    got = {(m.phase, m.mode, m.size) for m in result.measurements}
    assert got == {("prefill", "compile", 8), ("decode", "compile", 1)} and not result.skipped
    assert not any(type(m).__name__ == "SparseLinear" for m in model.modules())


def test_the_bench_summary_names_the_kernel_tune_chose_per_shape():
    from actsparse.core.tuning import Tuned
    from actsparse.eval.speed import chosen_paths

    shape = ("decode", "graph", 1, 4096, 28672, "2:4", "bfloat16")
    rows = [
        Tuned(*shape, 0.0523, 0.0718, layers=2),
        Tuned(*shape, 0.0432, 0.0718, layers=2, kernel="gemv_one"),
        Tuned("decode", "graph", 1, 4096, 1024, "2:4", "bfloat16", 0.0120, 0.0103),  # loses: the fallback
        Tuned("prefill", "eager", 8192, 4096, 14336, "2:4", "bfloat16", 1.5, 1.7, kernel="cslt24"),
    ]
    assert chosen_paths([r.to_dict() for r in rows]) == {
        "decode graph 1 4096->28672 x2": "gemv_one",
        "decode graph 1 4096->1024": None,
        "prefill eager 8192 4096->14336": "cslt24",
    }
