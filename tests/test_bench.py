"""`python -m uio_gguf.train.bench` runs end to end at the smallest settings (its figures are not asserted)."""

import json
import subprocess
import sys

from tests.helpers import REPO


def test_bench_json_has_a_row_per_estimator_and_length():
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "uio_gguf.train.bench",
            "--json",
            "--hidden",
            "32",
            "--layers",
            "1",
            "--segment",
            "16",
            "--ratio",
            "4",
            "--segments",
            "2,3",
            "--steps",
            "1",
            "--windows-per-pass",
            "3",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=True,
    )
    report = json.loads(result.stdout)
    assert report["config"]["segment"] == 16 and report["config"]["window"] == 2
    rows = report["rows"]
    assert [(r["estimator"], r["segments"]) for r in rows] == [
        ("full", 2),
        ("full", 3),
        ("unbiased", 2),
        ("unbiased", 3),
    ]
    for row in rows:
        assert set(row) == {
            "estimator",
            "window",
            "segments",
            "windows_per_pass",
            "step_peak_mb",
            "peak_rss_mb",
            "seconds_per_step",
        }
        assert row["step_peak_mb"] > 0 and row["peak_rss_mb"] > row["step_peak_mb"] and row["seconds_per_step"] > 0
    assert rows[0]["window"] is None and rows[2]["window"] == 2
    assert all(r["windows_per_pass"] == 3 for r in rows)
