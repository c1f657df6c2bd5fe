"""Bad input is refused in one line (rc 2) before any model loads or any pass runs; what a state fixes is never silently ignored."""

import json

import pytest
import torch
import yaml

from actsparse import SparsityConfig
from actsparse.calibration.layerwise import CalibrationOptions, calibrate_
from actsparse.calibration.state import META_FILE, TENSORS_FILE, save_state
from actsparse.cli.main import main
from actsparse.data.sources import load_text, stored_sample
from actsparse.errors import ActsparseError
from conftest import VOCAB, save_tiny_model_dir, tiny_model, vocab_text


class Loaded(Exception):
    """Raised by the stubbed model load: the command got past every check."""


@pytest.fixture
def no_load(monkeypatch):
    """Any model load fails the test's expectations: the refusal must come first."""
    import actsparse.models.loading as loading

    def load_model(*args, **kwargs):
        raise Loaded(args)

    monkeypatch.setattr(loading, "load_model", load_model)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    model_dir = save_tiny_model_dir(root / "model")  # noqa: F841
    (root / "eval.txt").write_text(vocab_text(documents=8, sentences=20, seed=1))
    (root / "calib.txt").write_text(vocab_text(documents=4, sentences=20, seed=2))
    return root


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def refused(capsys, *argv, match=None):
    code, out, err = run(capsys, *argv)
    assert code == 2, (out, err)
    assert err.startswith("actsparse: error:") and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    if match:
        assert match in err, err
    return err


def base(tiny, *extra, calib=True):
    given = ["--calib-data", str(tiny / "calib.txt")] if calib else []
    return [
        "eval",
        "--model",
        str(tiny / "model"),
        "--data",
        str(tiny / "eval.txt"),
        *given,
        "--seqlen",
        "16",
        "--no-progress",
        *extra,
    ]


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--batch-size", "0"], "--batch-size"),
        (["--batch-size", "-1"], "--batch-size"),
        (["--max-tokens", "-5"], "--max-tokens"),
        (["--max-tokens", "8"], "less than one window"),
        (["--seqlen", "1"], "--seqlen"),
        (["--seqlen", "abc"], "--seqlen"),
        (["--calib-windows", "0"], "--calib-windows"),
        (["--generate", "0"], "--generate"),
        (["--task-limit", "0"], "--task-limit"),
        (["--layers", "-1"], "--layers"),
        (["--layers", "99"], "does not exist"),
        (["--layers", "0,7"], "does not exist"),
        (["--skip", "@0-1"], "no linear layer"),
        (["--skip", "q,k,v,o,gate,up,down"], "no linear layer"),
        (["--roles", "qkv"], "not in this model"),
        (["--pattern", "2:5"], "multiple of 5"),
        (["--data", "nowhere.txt"], "nowhere.txt"),
        (["--device", "gpu"], "device"),
        (["--prune", "weights", "--criterion", "magnitude"], "--criterion"),
        (["--method", "wanda"], "--prune weights"),
        (["--backend", "triton", "--criterion", "random"], "no kernel"),
    ],
)
def test_bad_eval_input_is_one_line_before_the_model_loads(capsys, tiny, no_load, extra, match):
    refused(capsys, *base(tiny, *extra), match=match)


def test_width_hint_names_the_role_that_does_not_fit(capsys, tiny, no_load):
    err = refused(capsys, *base(tiny, "--pattern", "24:48"), match="multiple of 48")
    assert "--skip q" in err and "--skip down" not in err  # q (64 inputs) is the first layer that does not fit


def test_overlap_is_found_by_content_whatever_the_paths(capsys, tiny, no_load, tmp_path):
    copy = tmp_path / "copy.txt"
    copy.write_bytes((tiny / "eval.txt").read_bytes())
    refused(capsys, *base(tiny, "--criterion", "clact"), "--calib-data", str(copy), match="share text")
    # a criterion that needs no calibration: the given calibration text is still checked
    refused(capsys, *base(tiny), "--calib-data", str(tiny / "eval.txt"), match="overlap")
    part = tmp_path / "part.txt"
    part.write_text(vocab_text(documents=3, sentences=20, seed=5) + (tiny / "eval.txt").read_text().split("\n\n")[3])
    refused(capsys, *base(tiny, "--criterion", "clact"), "--calib-data", str(part), match="share text")


def test_disjoint_texts_get_through_to_the_model_load(tiny, no_load):
    with pytest.raises(Loaded):
        main(base(tiny, "--criterion", "clact", "--layers", "1", "--skip", "q@1"))


def test_brown_categories_do_not_look_like_copies():
    from actsparse.data.sources import check_disjoint

    check_disjoint(load_text("brown:news"), load_text("brown:learned+belles_lettres"))
    check_disjoint(load_text("brown:fiction+mystery"), load_text("brown:romance+adventure"))


def test_calibrate_refuses_what_does_not_apply_and_hides_it_from_help(capsys, tiny, no_load):
    common = ["calibrate", "--model", str(tiny / "model"), "--data", str(tiny / "eval.txt"), "--calib-data", str(tiny / "calib.txt"),
              "--mitigation", "oshift", "--out", "x"]  # fmt: skip
    refused(capsys, *common, "--prune", "weights", match="--prune")
    refused(capsys, *common, "--batch-size", "4", match="--batch-size")
    refused(capsys, *common, "--steps", "0", match="--steps")
    refused(capsys, *common, "--lr", "nan", match="--lr")
    from actsparse.cli.main import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["calibrate", "--help"])
    text = capsys.readouterr().out
    for option in ("--prune", "--method", "--max-tokens", "--batch-size"):
        assert option not in text
    assert "--calib-windows" in text and "--steps" in text


# ---- states ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def state(tiny, tmp_path_factory):
    model = tiny_model("llama")
    windows = torch.randint(3, VOCAB // 4, (4, 16), generator=torch.Generator().manual_seed(2))
    config = SparsityConfig(pattern="2:4", criterion="amber", mitigation="oshift", layers=(0, 1))
    calibrate_(model, config, windows, options=CalibrationOptions(steps=2), progress=False)
    calib = load_text(str(tiny / "calib.txt"))
    directory = tmp_path_factory.mktemp("states") / "oshift"
    save_state(
        model,
        directory,
        calibration={"data": calib.spec, "data_parts": sorted(calib.parts), "fingerprints": stored_sample(calib)},
    )
    return directory


@pytest.mark.parametrize(
    "extra",
    [
        ["--pattern", "8:16"],
        ["--criterion", "magnitude"],
        ["--mitigation", "none"],  # the defaults' values, typed
        ["--skip", "k"],
        ["--roles", "q"],
        ["--layers", "0"],
        ["--seed", "3"],
        ["--prefill-only"],
        ["--calib-data", "brown:news"],
        ["--calib-windows", "4"],
        ["--prune", "weights"],
        ["--method", "wanda"],
    ],
)
def test_eval_state_refuses_any_option_it_fixes(capsys, tiny, state, no_load, extra):
    err = refused(capsys, *base(tiny, "--state", str(state), *extra, calib=False))
    assert extra[0] in err


def test_eval_state_accepts_options_that_agree_and_honours_backend(capsys, tiny, state):
    code, out, err = run(capsys, *base(tiny, "--state", str(state), "--pattern", "2:4", "--layers", "1,0", "--backend", "torch",
                                       "--max-tokens", "32", "--json", calib=False))  # fmt: skip
    assert code == 0, err
    record = json.loads(out)
    assert record["config"]["backend"] == "torch" and record["config"]["mitigation"] == "oshift"


def _copy_state(state, tmp_path):
    import shutil

    copy = tmp_path / "state"
    shutil.copytree(state, copy)
    return copy


def test_an_edited_state_description_is_refused_before_the_model_loads(capsys, tiny, state, no_load, tmp_path):
    copy = _copy_state(state, tmp_path)
    meta = json.loads((copy / META_FILE).read_text())
    meta["config"]["pattern"] = "4:8"
    (copy / META_FILE).write_text(json.dumps(meta))
    refused(capsys, *base(tiny, "--state", str(copy), calib=False), match="meta_sha256")


def test_a_corrupted_state_is_refused_before_the_model_loads(capsys, tiny, state, no_load, tmp_path):
    copy = _copy_state(state, tmp_path)
    raw = bytearray((copy / TENSORS_FILE).read_bytes())
    raw[-3] ^= 0xFF
    (copy / TENSORS_FILE).write_bytes(bytes(raw))
    refused(capsys, *base(tiny, "--state", str(copy), calib=False), match="checksum")


def test_a_state_refuses_evaluation_text_that_contains_its_calibration_text(capsys, tiny, state, no_load, tmp_path):
    renamed = tmp_path / "renamed.txt"
    renamed.write_text((tiny / "calib.txt").read_text())
    with pytest.raises(Loaded):  # disjoint: reaches the load
        main(base(tiny, "--state", str(state), calib=False))
    capsys.readouterr()
    args = base(tiny, "--state", str(state), calib=False)
    args[args.index("--data") + 1] = str(renamed)  # the calibration text under another name
    refused(capsys, *args, match="share text")


# ---- sweep files -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "settings, grid, match",
    [
        ({"seqlen": "abc"}, {}, "settings: seqlen"),
        ({"seqlen": 0}, {}, "settings: seqlen"),
        ({"batch_size": 0}, {}, "settings: batch_size"),
        ({"max_tokens": -5}, {}, "settings: max_tokens"),
        ({"calib_windows": 1.5}, {}, "settings: calib_windows"),
        ({"dtype": "float8"}, {}, "settings: unknown dtype"),
        ({}, {"seed": "x"}, "grids[0]: seed"),
        ({}, {"layers": ["a"]}, "grids[0]: layers"),
        ({}, {"layers": []}, "grids[0]: layers is empty"),
        ({}, {"prefill_only": "no"}, "grids[0]: prefill_only"),
        ({}, {"backend": 3}, "grids[0]: unknown backend"),
        ({}, {"patterns": [124]}, "quote it"),
        ({}, {"calibration": {"lr": "fast"}}, "grids[0]: calibration: lr"),
        ({}, {"calibration": 5}, "calibration must be a mapping"),
    ],
)
def test_sweep_settings_are_checked_by_dry_run(capsys, tmp_path, no_load, settings, grid, match):
    data = {"models": ["m"], "store": str(tmp_path / "s.jsonl"), "settings": {"data": "brown:news", **settings},
            "grids": [{"target": "activations", "patterns": ["2:4"], "criteria": ["magnitude"], "mitigations": ["none"], **grid}]}  # fmt: skip
    if grid.get("calibration") is not None:
        data["grids"][0]["mitigations"] = ["oshift"]
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    refused(capsys, "sweep", str(path), "--dry-run", match=match)
    refused(capsys, "sweep", str(path), match=match)


def test_config_fields_are_checked():
    for bad in (
        {"layers": "0"},
        {"layers": [True]},
        {"seed": 1.5},
        {"prefill_only": 1},
        {"roles": []},
        {"skip": [3]},
        {"criterion": None},
    ):
        with pytest.raises(ActsparseError):
            SparsityConfig(**bad)
    assert SparsityConfig(skip="q@1", roles=["q", "k"], layers=[1]).skip == ("q@1",)
