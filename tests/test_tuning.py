"""tune_: the fast-path choices measured once per layer shape, then only looked up."""

import pytest
import torch

from actsparse import ActsparseError, SparsityConfig, sparsify_, tune_
from actsparse.core import dispatch
from actsparse.core.tuning import Tuned, distinct_groups, distinct_layers
from conftest import tiny_model


def test_a_cpu_model_has_nothing_to_tune():
    model = tiny_model("llama")
    sparsify_(model, SparsityConfig(pattern="2:4"))
    assert distinct_layers(model) == []
    assert tune_(model, prefill_rows=(512,)) == []


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(decode_rows=(0,)), "positive integers"),
        (dict(prefill_rows=(512, -1)), "positive integers"),
        (dict(decode_rows=(8,)), "decode rows go up to 4"),
        (dict(modes=("fast",)), "unknown mode"),
    ],
)
def test_bad_arguments_are_refused_before_any_timing(kwargs, message):
    model = tiny_model("llama")
    sparsify_(model, SparsityConfig(pattern="2:4"))
    with pytest.raises(ActsparseError, match=message):
        tune_(model, **kwargs)


def test_a_measurement_records_its_winner():
    row = Tuned("decode", "graph", 1, 4096, 14336, "8:16", "bfloat16", sparse_ms=0.02, dense_ms=0.03)
    assert row.sparse_wins and row.to_dict()["sparse_wins"] is True
    assert not Tuned("prefill", "eager", 512, 4096, 4096, "2:4", "bfloat16", 0.3, 0.2).sparse_wins


def test_one_layer_per_distinct_shape_and_config(monkeypatch):
    model = tiny_model("llama")
    sparsify_(model, SparsityConfig(pattern="2:4"))
    for module in model.modules():  # pretend the weights are on CUDA
        if type(module).__name__ == "SparseLinear":
            monkeypatch.setattr(type(module.weight), "is_cuda", property(lambda self: True), raising=False)
            break
    layers = distinct_layers(model)
    shapes = {(layer.in_features, layer.out_features) for layer in layers}
    assert len(layers) == len(shapes)  # one layer per shape (same pattern, dtype and mitigation everywhere)
    every = {(m.in_features, m.out_features) for m in model.modules() if type(m).__name__ == "SparseLinear"}
    assert shapes == every


@pytest.mark.skipif(not torch.cuda.is_available(), reason="timing the fast paths needs CUDA")
def test_tune_fills_both_tables_on_cuda(monkeypatch, tmp_path):
    from actsparse.eval.speed import preset_model

    monkeypatch.setattr(dispatch.DECODE_CHOICE, "measured", {})
    monkeypatch.setattr(dispatch.PREFILL_CHOICE, "measured", {})
    model = preset_model("tiny-llama", torch.bfloat16, torch.device("cuda"), seed=0)
    sparsify_(model, SparsityConfig(pattern="2:4"))
    rows = tune_(model, decode_rows=(1, 2), prefill_rows=(128,), repeats=3)
    layers, groups = distinct_layers(model), distinct_groups(model)
    assert len(groups) == 2  # q/k/v and gate/up, side by side
    # per layer: decode rows 1 (every kernel), 2 (the batched ones) and prefill 128 in eager and graph;
    # per group: decode 1 (every kernel), 2 (the batched ones)
    one_row = len(dispatch.DECODE_KERNELS)
    two_rows = {name for name, kernel in dispatch.DECODE_KERNELS.items() if kernel.max_rows >= 2}
    assert len(rows) == len(layers) * (one_row + len(two_rows) + 2) + len(groups) * (one_row + len(two_rows))
    assert {(r.in_features, r.out_features) for r in rows} >= {(g.in_features, g.out_features) for g in groups}
    assert all(r.sparse_ms >= 0 and r.dense_ms > 0 for r in rows)
    table = tmp_path / "fast-paths.json"
    first = tune_(model, decode_rows=(1,), prefill_rows=(128,), repeats=3, table=table)
    again = tune_(model, decode_rows=(1,), prefill_rows=(128,), repeats=3, table=table)
    assert again == first  # read back, nothing timed twice
    assert {r.kernel for r in rows if r.phase == "decode" and r.rows == 1} == set(dispatch.DECODE_KERNELS)
    assert {r.kernel for r in rows if r.phase == "decode" and r.rows == 2} == two_rows  # the others: one token only
    latest = {r.key: r for r in rows} | {r.key: r for r in again}  # the table's rows were measured again, and kept
    for r in latest.values():
        if r.phase == "decode":
            key = (r.in_features, r.out_features, r.rows, 2, 4, torch.bfloat16, r.layers)
            timed = [t for t in latest.values() if t.phase == "decode" and t.rows == r.rows
                     and (t.in_features, t.out_features, t.layers) == (r.in_features, r.out_features, r.layers)]  # fmt: skip
            fastest = min(timed, key=lambda t: t.sparse_ms)
            assert dispatch.DECODE_CHOICE.measured[key] == (fastest.kernel if fastest.sparse_wins else None)
        else:
            assert dispatch.PREFILL_CHOICE.measured[(r.mode, r.rows, r.in_features, r.out_features)] == r.sparse_wins


def test_a_table_file_keeps_measurements_per_gpu_and_versions(tmp_path, monkeypatch):
    from actsparse.core.tuning import read_table, record, write_table

    monkeypatch.setattr(dispatch.DECODE_CHOICE, "measured", {})
    monkeypatch.setattr(dispatch.PREFILL_CHOICE, "measured", {})
    path = tmp_path / "fast-paths.json"
    assert read_table(path) == {}  # not written yet
    h200 = [
        Tuned("decode", "graph", 1, 4096, 4096, "8:16", "bfloat16", 0.013, 0.019),
        Tuned("prefill", "eager", 8192, 4096, 14336, "2:4", "bfloat16", 1.76, 1.48),
    ]
    other = [Tuned("decode", "graph", 1, 4096, 4096, "8:16", "bfloat16", 0.03, 0.02)]
    write_table(path, "H200 | v1", h200)
    write_table(path, "H100 | v1", other)  # a second section leaves the first alone
    sections = read_table(path)
    assert sections["H200 | v1"] == h200 and sections["H100 | v1"] == other
    record(sections["H200 | v1"])
    assert dispatch.DECODE_CHOICE.measured == {(4096, 4096, 1, 8, 16, torch.bfloat16, 1): "gemv"}
    assert dispatch.PREFILL_CHOICE.measured == {("eager", 8192, 4096, 14336): False}


def test_the_fastest_decode_kernel_is_recorded_and_only_when_it_beats_the_fallback(monkeypatch):
    from actsparse.core.tuning import record

    monkeypatch.setattr(dispatch.DECODE_CHOICE, "measured", {})
    shape = ("decode", "graph", 1, 14336, 4096, "2:4", "bfloat16")
    record([Tuned(*shape, 0.0375, 0.045), Tuned(*shape, 0.0342, 0.045, kernel="gemv_one")])
    assert dispatch.DECODE_CHOICE.measured == {(14336, 4096, 1, 2, 4, torch.bfloat16, 1): "gemv_one"}
    record([Tuned(*shape, 0.030, 0.045), Tuned(*shape, 0.0342, 0.045, kernel="gemv_one")])  # order does not matter
    assert dispatch.DECODE_CHOICE.measured[(14336, 4096, 1, 2, 4, torch.bfloat16, 1)] == "gemv"
    record([Tuned(*shape, 0.050, 0.045), Tuned(*shape, 0.046, 0.045, kernel="gemv_one")])  # both lose: the fallback
    assert dispatch.DECODE_CHOICE.measured[(14336, 4096, 1, 2, 4, torch.bfloat16, 1)] is None


def test_rows_stored_before_kernels_were_recorded_read_as_the_batched_gemv_and_cusparselt(tmp_path):
    import json

    from actsparse.core.tuning import TABLE_FORMAT, read_table

    old = [
        {"phase": "decode", "mode": "graph", "rows": 1, "in_features": 64, "out_features": 32, "pattern": "2:4",
         "dtype": "bfloat16", "sparse_ms": 0.01, "dense_ms": 0.02, "layers": 1, "sparse_wins": True},
        {"phase": "prefill", "mode": "eager", "rows": 512, "in_features": 64, "out_features": 32, "pattern": "2:4",
         "dtype": "bfloat16", "sparse_ms": 0.3, "dense_ms": 0.2, "layers": 1, "sparse_wins": False},
    ]  # fmt: skip
    path = tmp_path / "old.json"
    path.write_text(json.dumps({"format": TABLE_FORMAT, "sections": {"H200 | v0": old}}))
    decode, prefill = read_table(path)["H200 | v0"]
    assert (decode.kernel, prefill.kernel) == ("gemv", "cslt24")


def test_an_unreadable_table_is_refused_with_the_fix(tmp_path):
    from actsparse.core.tuning import read_table

    path = tmp_path / "fast-paths.json"
    path.write_text('{"format": 99, "sections": {}}')
    with pytest.raises(ActsparseError, match="not a fast-path table.*delete it"):
        read_table(path)
    path.write_text("not json")
    with pytest.raises(ActsparseError, match="not a fast-path table"):
        read_table(path)


def test_tuning_a_cpu_model_writes_no_table(tmp_path):
    model = tiny_model("llama")
    sparsify_(model, SparsityConfig(pattern="2:4"))
    assert tune_(model, table=tmp_path / "t.json") == [] and not (tmp_path / "t.json").exists()


def test_a_decode_kernel_that_disagrees_with_the_fallback_is_never_timed(monkeypatch):
    """tune_ checks each kernel's output on the shape first: a wrong one (a miscompile, say) is
    left out with a warning, so it can never be recorded as the fastest."""
    from actsparse.core import tuning

    right = dispatch.DecodeKernel("right", 1, None, lambda k, o: 64)
    wrong = dispatch.DecodeKernel("wrong", 1, None, lambda k, o: 64)
    batched_only = dispatch.DecodeKernel("batched", 4, None, lambda k, o: 64)
    monkeypatch.setattr(tuning, "DECODE_KERNELS", {k.name: k for k in (right, wrong, batched_only)})
    expected = torch.randn(1, 96)
    outputs = {"right": expected + 1e-4 * torch.randn(1, 96), "wrong": expected.flip(-1), "batched": expected.clone()}
    timed = []

    def clock(fn, calls, mode):
        timed.append(fn)
        return 0.01

    def kernel_call(kernel):
        return lambda: outputs[kernel.name]

    with pytest.warns(RuntimeWarning, match="the wrong GEMV differs"):
        times = tuning._decode_rows(clock, 1, lambda: expected, kernel_call, lambda name: False)
    assert [name for name, _, _ in times] == ["right", "batched"]
    assert len(timed) == 3  # the fallback and the two kernels that agree
    # linked layers: lists of outputs, compared as one
    with pytest.warns(RuntimeWarning, match="the wrong GEMV differs"):
        group = tuning._decode_rows(clock, 1, lambda: [expected, expected], lambda k: lambda: [outputs[k.name]] * 2,
                                    lambda name: name == "batched")  # fmt: skip
    assert [name for name, _, _ in group] == ["right"]
