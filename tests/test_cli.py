import json
import subprocess
import sys

import pytest

from actsparse.cli.main import main


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_patterns_table(capsys):
    code, out, _ = run(capsys, "patterns", "2:4", "8:16", "16:32", "unstructured:0.5")
    assert code == 0
    rows = {line.split()[0]: line.split() for line in out.splitlines()[1:]}
    assert rows["2:4"][1:] == ["0.500", "4", "3", "1.5"]
    assert rows["16:32"][3] == "30"
    assert rows["unstructured:0.5"][2] == "-"


def test_methods_lists_registries_and_flags(capsys):
    code, out, _ = run(capsys, "methods")
    assert code == 0
    for name in ("magnitude", "wina", "amber", "clact", "clact-batch", "var-weight", "random", "none", "var", "dpts", "smooth"):
        assert f"  {name} " in out
    assert "non-causal" in out and "needs calibration" in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["eval", "--pattern", "4:2"], "1 <= N < M"),
        (["eval", "--pattern", "two:four"], "cannot parse pattern"),
        (["eval", "--criterion", "bogus"], "unknown criterion"),
        (["eval", "--mitigation", "bogus"], "unknown mitigation"),
        (["eval", "--skip", "zz"], "unknown role"),
        (["fetch", "nothing"], "unknown asset"),
    ],
)
def test_bad_input_gives_one_clear_line_and_exit_code_2(capsys, argv, message):
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert message in err and "Traceback" not in err
    assert err.startswith("actsparse: error:")


def test_missing_model_and_corpus_are_clear(capsys, tiny_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, _, err = run(capsys, "eval", "--model", str(tiny_dir / "nowhere"), "--no-progress")
    assert code == 2 and "nowhere" in err
    code, _, err = run(capsys, "eval", "--model", str(tiny_dir), "--data", str(tiny_dir / "missing.txt"), "--no-progress")
    assert code == 2 and "missing.txt" in err


def test_width_mismatch_is_clear(capsys, tiny_dir):
    code, _, err = run(
        capsys,
        "eval",
        "--model",
        str(tiny_dir),
        "--data",
        str(tiny_dir / "text.txt"),
        "--pattern",
        "24:48",
        "--seqlen",
        "16",
        "--no-progress",
    )
    assert code == 2 and "multiple of 48" in err


def test_eval_json_record_and_out_file(capsys, tiny_dir, tmp_path):
    out_file = tmp_path / "result.json"
    argv = ["eval", "--model", str(tiny_dir), "--data", str(tiny_dir / "text.txt"), "--seqlen", "16", "--max-tokens", "64",
            "--pattern", "2:4", "--criterion", "amber", "--mitigation", "var", "--json", "--no-progress", "--out", str(out_file)]  # fmt: skip
    code, out, _ = run(capsys, *argv)
    assert code == 0
    record = json.loads(out)
    assert record["tokens"] == 4 * 16 and record["windows"] == 4
    assert record["config"]["pattern"] == "2:4" and record["config"]["criterion"] == "amber"
    assert record["sparse_flop_fraction"] == pytest.approx(1.0)
    assert {"dense_ppl", "sparse_ppl", "versions", "settings"} <= set(record)
    assert json.loads(out_file.read_text())["sparse_ppl"] == record["sparse_ppl"]


def test_eval_table_output(capsys, tiny_dir):
    code, out, _ = run(
        capsys,
        "eval",
        "--model",
        str(tiny_dir),
        "--data",
        str(tiny_dir / "text.txt"),
        "--seqlen",
        "16",
        "--pattern",
        "8:16",
        "--no-progress",
    )
    assert code == 0
    assert "perplexity" in out and "sparse linear FLOPs 100.0%" in out and "time" in out


def test_help_everywhere():
    for argv in ([], ["eval"], ["patterns"], ["fetch"], ["methods"], ["layers"]):
        result = subprocess.run([sys.executable, "-m", "actsparse.cli.main", *argv, "--help"], capture_output=True, text=True)
        assert result.returncode == 0 and "usage: actsparse" in result.stdout


def test_shared_argument_types_refuse_in_one_line():
    import argparse

    from actsparse.cli.options import layer_indices, positive_int, positive_ints, whole

    for parse, text, message in [
        (layer_indices, "x", "expected comma-separated layer indices like 0,1,2, got 'x'"),
        (layer_indices, "-1", "expected comma-separated layer indices >= 0 like 0,1,2, got '-1'"),
        (positive_ints, "0", "expected comma-separated positive integers like 512,1024, got '0'"),
        (positive_int, "0", "expected a positive integer, got '0'"),
        (whole(2), "1", "must be >= 2, got 1"),
    ]:
        with pytest.raises(argparse.ArgumentTypeError, match=message):
            parse(text)
    assert layer_indices(" 0, 2 ") == (0, 2) and positive_ints("512,1024") == (512, 1024) and positive_int("3") == 3
