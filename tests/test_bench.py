"""The benchmark runs end to end and reports ratios measured in one run (no timing asserts)."""

import json
import subprocess
import sys


def test_bench_prints_one_json_object_with_ratios():
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "lessons.bench",
            "--profile",
            "ci",
            "--json",
            "--steps",
            "6",
            "--workers",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    for key in (
        "engine_img_per_s",
        "baseline_img_per_s",
        "speedup",
        "first_point_s",
        "lesson_run_s",
    ):
        assert result[key] > 0, key
    ratio = result["engine_img_per_s"] / result["baseline_img_per_s"]
    assert abs(result["speedup"] - ratio) < 0.01
    micro = result["micro_vmap_img_per_s"] / result["micro_loop_img_per_s"]
    assert abs(result["micro_vmap_speedup"] - micro) < 0.01
    assert result["profile"] == "ci" and result["steps"] == 6 and result["workers"] == 1
    assert 0 <= result["lesson_val_acc"] <= 1
