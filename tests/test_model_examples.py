"""The model-serving examples (scikit-learn models trained at start-up) run end to end."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import fleet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(name: str) -> str:
    fleet.shutdown()
    out = subprocess.run([sys.executable, os.path.join(ROOT, "examples", f"{name}.py")],
                         capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_digits_classifier_over_oip_rest_grpc_and_a_handle():
    stdout = _run("models_digits")
    digits = re.search(r"REST: \[(.*)\]", stdout)
    assert digits and len(digits.group(1).split(",")) == 20
    accuracy = float(re.search(r"gRPC: accuracy ([\d.]+) on 297", stdout).group(1))  # type: ignore
    assert accuracy > 0.9
    assert re.search(r"handle: \[\d, \d, \d\] expected \[1, 7, 4\]", stdout)


def test_batched_network_answers_like_the_unbatched_one():
    stdout = _run("models_batching")
    # the script asserts both paths give the same digits; the gain is printed, not pinned
    assert re.search(r"batched \d+ calls/s, unbatched \d+ calls/s, gain [\d.]+x", stdout)
    assert float(re.search(r"accuracy ([\d.]+)", stdout).group(1)) > 0.9  # type: ignore


def test_multiplexed_models_by_id_over_http_and_a_handle():
    stdout = _run("models_multiplexed")
    answers = re.findall(r"\{'model': '(\w+)', 'digit': (\d+)\} expected (\d+)", stdout)
    assert [a[0] for a in answers] == ["logistic", "knn", "tree"] * 3 + ["knn"]
    assert all(digit == expected for _, digit, expected in answers)
