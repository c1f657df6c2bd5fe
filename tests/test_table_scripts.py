"""The Markdown tables of the scripts behind RESULTS.md (scripts/calibrated_table.py)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

from calibrated_table import table  # noqa: E402


def record(pattern, criterion, mitigation, ppl, seconds=None, device="gpu"):
    out = {
        "config": {"pattern": pattern, "criterion": criterion, "mitigation": mitigation}, "sparse_ppl": ppl, "dense_ppl": 10.0,
        "model": "m", "data": "d", "settings": {"seqlen": 8, "dtype": "float32"}, "windows": 2, "tokens": 14,
        "versions": {"device": device},
    }  # fmt: skip
    if seconds is not None:
        out["calibration"] = {"seconds": seconds, "data": "c", "windows": 4, "seqlen": 8, "options": {"lr": 1e-4, "steps": None}}
    return out


def rows(text):
    return {
        line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
        for line in text.splitlines()
        if line.startswith("| ")
    }


def test_cells_missing_cells_and_seconds_per_device():
    records = [
        record("2:4", "magnitude", "none", 20.0),
        record("2:4", "magnitude", "spts", 19.5, seconds=30.0),
        record("8:16", "amber", "spts", 12.25, seconds=50.0),
        record("2:4", "amber", "lpts", 18.0, seconds=400.0),
        record("8:16", "magnitude", "lpts", 11.0, seconds=3000.0, device="cpu"),
    ]
    text = table(records, mitigations=["none", "spts", "lpts"])
    got = rows(text)
    assert got["dense"][:4] == ["10.00"] * 4
    assert got["none"] == ["20.00", "–", "–", "–", "–"]  # no calibration: no seconds
    assert got["spts"] == ["19.50", "–", "–", "12.25", "50.0"]  # max over the row
    assert got["lpts"] == ["–", "18.00", "11.00", "–", "400.0 (gpu) / 3000.0 (cpu)"]
    assert "Device: cpu, gpu" in text
    assert "Device:" in table(records[:3], mitigations=["none"]) and "(calibration seconds by device" not in table(
        records[:3], mitigations=["none"]
    )
