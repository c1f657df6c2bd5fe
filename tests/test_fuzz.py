"""Fuzzing the inputs: CLI arguments, sweep settings and config fields give either our own one-line
error (rc 2) or get through every check to the model load with a selection that sparsifies
something; never a traceback, never a silent 0% run. No model is loaded (the load is stubbed)."""

import string

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from actsparse import SparsityConfig
from actsparse.baselines import WeightPruneConfig
from actsparse.cli.main import main
from actsparse.errors import ActsparseError
from actsparse.models.discovery import find_linear_sites
from actsparse.selection import choose_sites
from actsparse.sweep import parse_sweep
from conftest import save_tiny_model_dir, tiny_model, vocab_text

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
SITES = find_linear_sites(tiny_model("llama"))  # 2 decoder layers, hidden 64, intermediate 128


class Loaded(Exception):
    pass


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    save_tiny_model_dir(root / "model")
    (root / "eval.txt").write_text(vocab_text(documents=6, sentences=20, seed=1))
    (root / "calib.txt").write_text(vocab_text(documents=4, sentences=20, seed=2))
    return root


@pytest.fixture
def stubbed(monkeypatch):
    import actsparse.models.loading as loading

    seen = []

    def load_model(*args, **kwargs):
        raise Loaded()

    monkeypatch.setattr(loading, "load_model", load_model)
    return seen


junk = st.text(alphabet=string.ascii_letters + string.digits + ":,@-._+ ", min_size=0, max_size=8)
numbers = st.one_of(st.integers(-3, 40).map(str), st.sampled_from(["0", "-1", "1e3", "nan", "inf", "1.5", "", "x"]))
VALUES = {
    "--pattern": st.one_of(
        st.sampled_from(
            [
                "2:4",
                "8:16",
                "4:8",
                "1:2",
                "2:5",
                "24:48",
                "0:4",
                "4:4",
                "dense",
                "unstructured:0.5",
                "unstructured:1",
                "unstructured:-0.1",
                "unstructured:nan",
                "16:32",
                "3:64",
            ]
        ),
        junk,
    ),
    "--criterion": st.one_of(st.sampled_from(["magnitude", "amber", "clact", "wina", "random", "clact-batch"]), junk),
    "--mitigation": st.one_of(st.sampled_from(["none", "var", "dpts", "smooth", "oshift", "lpts"]), junk),
    "--roles": st.one_of(st.sampled_from(["q", "q,k", "qkv", "down", "gate,up", ",", "zz"]), junk),
    "--layers": st.one_of(st.sampled_from(["0", "1", "0,1", "2", "99", "-1", "", "a"]), junk),
    "--skip": st.one_of(st.sampled_from(["k", "q@1", "@0", "@0-1", "@5", "q,k,v,o,gate,up,down", "down@0,1", "q@x"]), junk),
    "--seed": numbers,
    "--backend": st.sampled_from(["auto", "torch", "triton", "cuda"]),
    "--prune": st.sampled_from(["activations", "weights", "neurons"]),
    "--method": st.one_of(st.sampled_from(["magnitude", "wanda", "sparsegpt"]), junk),
    "--seqlen": numbers,
    "--max-tokens": numbers,
    "--batch-size": numbers,
    "--calib-windows": numbers,
    "--dtype": st.sampled_from(["float32", "bfloat16", "float8", "int4"]),
    "--device": st.sampled_from(["cpu", "auto", "cuda", "cuda:7", "gpu", "meta:x"]),
    "--data": st.sampled_from(["EVAL", "CALIB", "brown:", "wikitext2:dev", "nowhere.txt"]),
    "--calib-data": st.sampled_from(["EVAL", "CALIB", "brown:zz", "nowhere.txt"]),
    "--task-batch-size": numbers,
    "--task-limit": numbers,
    "--generate": numbers,
    "--state": st.sampled_from(["nowhere", "MODEL"]),
}
FLAGS = ["--prefill-only", "--json"]


def _argv(tiny, options: dict, flags: list) -> list[str]:
    argv = ["eval", "--model", str(tiny / "model"), "--data", str(tiny / "eval.txt"), "--seqlen", "16", "--no-progress"]
    where = {"EVAL": str(tiny / "eval.txt"), "CALIB": str(tiny / "calib.txt"), "MODEL": str(tiny / "model")}
    for option, value in options.items():
        argv += [option, where.get(value, value)]
    return argv + flags


@FUZZ
@given(
    options=st.dictionaries(st.sampled_from(sorted(VALUES)), st.none(), max_size=5).flatmap(
        lambda keys: st.fixed_dictionaries({key: VALUES[key] for key in keys})
    ),
    flags=st.lists(st.sampled_from(FLAGS), unique=True),
)
def test_fuzzed_cli_arguments_give_one_clear_line_or_reach_the_load(tiny, stubbed, capsys, options, flags):
    argv = _argv(tiny, options, flags)
    try:
        code = main(argv)
    except Loaded:
        capsys.readouterr()
        # everything was accepted: the run would sparsify (or prune) at least one layer, never 0%
        pattern = options.get("--pattern", "8:16")
        if pattern.strip().lower() != "dense" and "--state" not in options:
            fields = {"pattern": pattern}
            for option, key in (("--roles", "roles"), ("--layers", "layers"), ("--skip", "skip")):
                if option in options:
                    parts = [p.strip() for p in options[option].split(",") if p.strip()]
                    fields[key] = tuple(int(p) for p in parts) if key == "layers" else tuple(parts)
            if options.get("--prune") == "weights":
                config = WeightPruneConfig(**fields)
            else:
                config = SparsityConfig(**fields)
            assert choose_sites(config, SITES)
        return
    out, err = capsys.readouterr()
    assert code == 2, (argv, out, err)
    assert err.startswith("actsparse: error:") and len(err.strip().splitlines()) == 1, (argv, err)


plain = st.one_of(st.none(), st.booleans(), st.integers(-3, 600), st.floats(allow_nan=True, allow_infinity=True), junk,
                  st.lists(st.one_of(st.integers(-2, 40), junk), max_size=3))  # fmt: skip
SETTING_VALUES = {
    "seqlen": st.one_of(plain, st.sampled_from([16, 512])),
    "max_tokens": st.one_of(plain, st.sampled_from([4096, None])),
    "batch_size": plain,
    "calib_windows": plain,
    "dtype": st.one_of(plain, st.sampled_from(["float32", "bfloat16"])),
    "device": st.one_of(plain, st.sampled_from(["cpu", "auto", "cuda:0"])),
    "data": st.one_of(plain, st.just("brown:news")),
    "calib_data": plain,
}
GRID_VALUES = {
    "patterns": st.one_of(plain, st.just(["2:4", "8:16"])),
    "criteria": st.one_of(plain, st.just(["amber"])),
    "mitigations": st.one_of(plain, st.just(["none", "oshift"])),
    "roles": plain,
    "layers": plain,
    "skip": plain,
    "seed": plain,
    "backend": plain,
    "prefill_only": plain,
    "calibration": st.one_of(plain, st.fixed_dictionaries({"windows": plain, "lr": plain})),
}


@FUZZ
@given(
    chosen=st.dictionaries(st.sampled_from(sorted(SETTING_VALUES)), st.none(), max_size=3).flatmap(
        lambda keys: st.fixed_dictionaries({key: SETTING_VALUES[key] for key in keys})),
    grid=st.dictionaries(st.sampled_from(sorted(GRID_VALUES)), st.none(), max_size=3).flatmap(
        lambda keys: st.fixed_dictionaries({key: GRID_VALUES[key] for key in keys})),
    tasks=st.one_of(st.none(), plain, st.fixed_dictionaries({"batch_size": plain})),
    generate=st.one_of(st.none(), plain, st.fixed_dictionaries({"max_new_tokens": plain})),
)  # fmt: skip
def test_fuzzed_sweep_settings_are_refused_in_one_line_or_parse_into_valid_runs(chosen, grid, tasks, generate):
    data = {"models": ["m"], "settings": {"data": "brown:news", "seqlen": 16, **chosen},
            "grids": [{"target": "activations", "patterns": ["2:4"], "criteria": ["magnitude"], "mitigations": ["none"], **grid}]}  # fmt: skip
    for key, value in (("tasks", tasks), ("generate", generate)):
        if value is not None:
            data[key] = value
    text = yaml.safe_dump(data)  # through YAML, as a file would come
    try:
        spec = parse_sweep(yaml.safe_load(text))
    except ActsparseError as error:
        assert "\n" not in str(error)
        return
    for run in spec.runs:
        assert isinstance(run.settings.seqlen, int) and run.settings.seqlen >= 2 and isinstance(run.settings.batch_size, int)
        assert isinstance(run.config.seed, int) and all(isinstance(layer, int) for layer in run.config.layers or ())
        run.key  # noqa: B018  every run has a key (its identity is plain JSON)


@FUZZ
@given(fields=st.fixed_dictionaries({}, optional={
    "pattern": st.one_of(plain, VALUES["--pattern"]), "criterion": st.one_of(plain, VALUES["--criterion"]),
    "mitigation": st.one_of(plain, st.sampled_from(["none", "var"])), "roles": st.one_of(plain, st.just(["q", "down"])),
    "layers": st.one_of(plain, st.just([0, 1])), "skip": st.one_of(plain, st.just(["q@1"])), "seed": plain,
    "backend": st.one_of(plain, st.just("torch")), "prefill_only": plain,
}), weights=st.booleans())  # fmt: skip
def test_fuzzed_config_fields_are_refused_or_select_something(fields, weights):
    try:
        if weights:
            fields = {k: v for k, v in fields.items() if k in ("pattern", "roles", "layers", "skip", "seed")}
            config = WeightPruneConfig(**fields)
        else:
            config = SparsityConfig(**fields)
        chosen = choose_sites(config, SITES)
    except ActsparseError as error:
        assert "\n" not in str(error)
        return
    assert chosen or str(config.pattern).strip().lower() == "dense"


OTHER = {
    "calibrate": ["--pattern", "--criterion", "--mitigation", "--roles", "--layers", "--skip", "--seed", "--seqlen", "--calib-windows",
                  "--dtype", "--device", "--data", "--calib-data", "--prune", "--batch-size", "--max-tokens"],
    "sensitivity": ["--pattern", "--criterion", "--mitigation", "--seqlen", "--calib-windows", "--dtype", "--device", "--calib-data"],
}  # fmt: skip
EXTRA = {"--steps": numbers, "--lr": numbers, "--target-fraction": st.sampled_from(["0.5", "1.5", "-0.1", "nan", "x", "1"])}


@FUZZ
@given(command=st.sampled_from(sorted(OTHER)), data=st.data())
def test_fuzzed_calibrate_and_sensitivity_arguments(tiny, stubbed, capsys, tmp_path_factory, command, data):
    keys = OTHER[command] + (["--steps", "--lr"] if command == "calibrate" else ["--target-fraction"])
    chosen = data.draw(st.lists(st.sampled_from(keys), unique=True, max_size=4))
    options = {key: data.draw(VALUES[key] if key in VALUES else EXTRA[key]) for key in chosen}
    where = {"EVAL": str(tiny / "eval.txt"), "CALIB": str(tiny / "calib.txt"), "MODEL": str(tiny / "model")}
    argv = [command, "--model", str(tiny / "model"), "--seqlen", "16", "--no-progress", "--calib-data", str(tiny / "calib.txt")]
    argv += ["--mitigation", "oshift"] if command == "calibrate" else []
    argv += ["--out", str(tmp_path_factory.mktemp("out") / "o")]
    for option, value in options.items():
        argv += [option, where.get(value, value)]
    try:
        code = main(argv)
    except Loaded:
        capsys.readouterr()
        return
    out, err = capsys.readouterr()
    assert code == 2, (argv, out, err)
    assert err.startswith("actsparse: error:") and len(err.strip().splitlines()) == 1, (argv, err)
