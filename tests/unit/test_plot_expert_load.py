"""tools/plot_expert_load.py on a synthetic metrics file: the PNG, the summary's numbers (worked out by hand
below), the records it must skip, and its one-line errors."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOL = os.path.join(ROOT, "tools", "plot_expert_load.py")

# Two MoE layers (global 1 and 3), 8 experts, EP 4 (two experts a rank).
A = [0, 0, 1, 1, 2, 2, 3, 3]  # initial placement
B = [0, 1, 0, 1, 2, 2, 3, 3]  # layer 1 after the rebalance at iteration 25 (experts 1 and 2 swapped)
SKEWED = [40, 40, 10, 10, 10, 10, 20, 20]  # total 160, mean rank load 40
# Layer 1: SKEWED under A -> ranks [80, 20, 20, 40] -> 80/40 = 2.0; under B -> [50, 50, 20, 40] -> 1.25.
# At 40: [36, 44, 12, 8, 10, 10, 20, 20] under B -> [48, 52, 20, 40] -> 52/40 = 1.3.
# Layer 3: uniform -> 1.0; at 40: [30, 10, 10, 10, 10, 10, 10, 30] under A -> [40, 20, 20, 40] -> 40/30.
LAYER1 = {10: (SKEWED, A), 20: (SKEWED, A), 30: (SKEWED, B), 40: ([36, 44, 12, 8, 10, 10, 20, 20], B)}
LAYER3 = {10: [10] * 8, 20: [10] * 8, 30: [10] * 8, 40: [30, 10, 10, 10, 10, 10, 10, 30]}
IMBALANCE = {1: [2.0, 2.0, 1.25, 1.3], 3: [1.0, 1.0, 1.0, 40 / 30]}


def load_record(it: int) -> dict:
    loads, ranks = LAYER1[it]
    return {"iteration": it, "lm_loss": 5.0, "moe_expert_load": [loads, LAYER3[it]],
            "moe_expert_load_layers": [1, 3], "moe_expert_rank": [ranks, A]}


def write_lines(path, lines: list[str]) -> str:
    path.write_text("\n".join(lines))
    return str(path)


@pytest.fixture
def metrics(tmp_path) -> str:
    stale30 = load_record(30)
    stale30["moe_expert_load"] = [[160, 0, 0, 0, 0, 0, 0, 0], [10] * 8]  # 4.0, if it were not replaced
    rec = json.dumps
    return write_lines(tmp_path / "metrics.jsonl", [
        rec({"iteration": 9, "lm_loss": 5.1}),
        rec(load_record(10)),
        rec({"iteration": 10, "eval_lm_loss": 5.3}),
        rec(load_record(20)),
        rec({"iteration": 25, "lm_loss": 5.0, "moe_experts_moved": 2, "moe_rebalance_bytes": 3 * 2**20,
             "moe_rebalance_seconds": 0.125, "moe_rank_load_before": [2.0, 1.0],
             "moe_rank_load_after": [1.25, 1.0]}),
        rec(stale30),
        # The run died mid-write; the run resumed from iteration 20 appended after the partial line.
        '{"iteration": 31, "lm_lo' + rec({"iteration": 21, "lm_loss": 5.0}),
        rec(load_record(30)),
        rec(load_record(40)),
        rec({"iteration": 40, "eval_lm_loss": 4.9}),
        '{"iteration": 41, "moe_expert_load": [[3, 4',  # truncated last line
    ])


def load_tool():
    spec = importlib.util.spec_from_file_location("tools_plot_expert_load", TOOL)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_plot_and_summary(metrics, tmp_path):
    out = tmp_path / "load.png"
    proc = subprocess.run([sys.executable, TOOL, metrics, "-o", str(out), "--title", "synthetic"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    s = proc.stdout
    assert "iterations     10..40 (4 load records), 2 unreadable line(s) skipped" in s, s
    assert "2 MoE layer(s) [1, 3], 8 experts, EP 4" in s, s
    assert "rebalances     1\n  iteration 25: 2 experts moved, 3.00 MiB, 0.125 s; " \
           "max/mean layer 1 2.000->1.250, layer 3 1.000->1.000" in s, s
    assert "layer 1        imbalance first 2.000 (iteration 10), last 1.300 (iteration 40)" in s, s
    assert "layer 3        imbalance first 1.000 (iteration 10), last 1.333 (iteration 40)" in s, s

    from matplotlib.image import imread

    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = imread(str(out))
    # 10 x 6.5 inches at 100 dpi: two 1.4-inch heatmaps, the 2.8-inch imbalance plot, 0.9 for the title.
    assert img.shape == (650, 1000, 4), img.shape
    assert img[..., :3].std() > 0.05  # drawn, not blank
    assert sorted(os.listdir(tmp_path)) == ["load.png", "metrics.jsonl"]  # no temp file left beside


def test_series_values_and_layer_subset(metrics, tmp_path, capsys):
    tool = load_tool()
    m = tool.read_metrics(metrics)
    for s in tool.series(m, [1, 3]):
        assert s.iterations == [10, 20, 30, 40]
        np.testing.assert_allclose(s.imbalance, IMBALANCE[s.layer])  # the replayed 30 replaced the stale
        np.testing.assert_allclose(s.share.sum(axis=0), 1.0)
    assert [(r.iteration, r.moved) for r in m.rebalances] == [(25, 2)]

    out = tmp_path / "sub.png"
    out.write_bytes(b"old")  # replaced whole
    assert tool.main([metrics, "-o", str(out), "--layers", "3"]) == 0
    s = capsys.readouterr().out
    assert "1 MoE layer(s) [3]" in s and "layer 1 " not in s and "max/mean layer 3 1.000->1.000" in s, s
    from matplotlib.image import imread

    assert imread(str(out)).shape == (510, 1000, 4)  # one heatmap: 1.4 + 2.8 + 0.9 inches


def one_line_error(capsys, tool, *argv: str) -> str:
    capsys.readouterr()
    assert tool.main(list(argv)) == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("plot_expert_load: error: "), lines
    return lines[0]


def test_errors(metrics, tmp_path, capsys):
    tool = load_tool()
    out = str(tmp_path / "x.png")
    assert "cannot read metrics file" in one_line_error(capsys, tool, str(tmp_path / "none.jsonl"), "-o", out)

    plain = write_lines(tmp_path / "plain.jsonl", [json.dumps({"iteration": i, "lm_loss": 5.0})
                                                    for i in range(1, 4)])
    msg = one_line_error(capsys, tool, plain, "-o", out)
    assert 'no line has "moe_expert_load"' in msg and "--log-interval" in msg and "MoE model" in msg

    fewer = load_record(20)
    fewer["moe_expert_load"][0] = SKEWED[:4]
    fewer["moe_expert_rank"][0] = [0, 1, 2, 3]
    changed = write_lines(tmp_path / "changed.jsonl", [json.dumps(load_record(10)), json.dumps(fewer)])
    msg = one_line_error(capsys, tool, changed, "-o", out)
    assert "inconsistent expert counts: layer 1 has 8 experts before iteration 20 and 4" in msg

    short_rank = load_record(10)
    short_rank["moe_expert_rank"][1] = [0, 1, 2, 3]
    bad = write_lines(tmp_path / "rank.jsonl", [json.dumps(short_rank)])
    msg = one_line_error(capsys, tool, bad, "-o", out)
    assert "inconsistent expert counts: layer 3 has 8 loads but 4" in msg

    assert "does not exist" in one_line_error(capsys, tool, metrics, "-o", str(tmp_path / "no" / "x.png"))
    assert "no MoE layer 5 (it has layers 1, 3)" in one_line_error(capsys, tool, metrics, "-o", out,
                                                                   "--layers", "1,5")
    assert "comma-separated" in one_line_error(capsys, tool, metrics, "-o", out, "--layers", "one")
    assert not os.path.exists(out)


def test_error_exit_code_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, TOOL, str(tmp_path / "none.jsonl"), "-o", str(tmp_path / "x.png")],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == ["plot_expert_load: error: cannot read metrics file "
                                                f"{tmp_path / 'none.jsonl'}: No such file or directory"]
