"""The benchmark report runs end to end on a tiny sweep and writes every output."""

import dataclasses
import json

import pytest

from benchmarks import report
from benchmarks.suites import SUITES


def test_report_writes_rows_tables_and_charts(tmp_path, capsys):
    methods = ["naive", "fastdpo-torch", "unfused-naive", "fastdpo-fused-linear-torch"]
    sizes = ["--vocabs", "300", "--seq-lens", "16", "--hidden", "8", "--dtypes", "bfloat16", "--rounds", "2"]
    code = report.main(["--methods", *methods, *sizes, "--out", str(tmp_path)])
    assert code == 0
    data = json.loads((tmp_path / "report.json").read_text())
    assert {"timestamp", "cpu", "cpu_features", "versions"} <= set(data["machine"])
    rows = {(r["suite"], r["method"]): r for r in data["rows"]}
    assert set(rows) == {
        ("logits", "naive"),
        ("logits", "fastdpo-torch"),
        ("linear", "unfused-naive"),
        ("linear", "fastdpo-fused-linear-torch"),
    }
    assert rows["logits", "naive"]["speedup_vs_baseline"] == 1.0
    assert rows["linear", "unfused-naive"]["speedup_vs_baseline"] == 1.0
    assert len(rows["logits", "fastdpo-torch"]["times"]) == 2
    assert rows["logits", "fastdpo-torch"]["max_abs_error"] < 1e-3
    assert rows["linear", "fastdpo-fused-linear-torch"]["max_abs_error"] < 1e-3
    assert rows["linear", "fastdpo-fused-linear-torch"]["hidden"] == 8
    table = (tmp_path / "report.md").read_text()
    assert "| 16 | 300 | bfloat16 | fastdpo-torch |" in table
    assert "| 16 | 8 | 300 | bfloat16 | fastdpo-fused-linear-torch |" in table
    assert (tmp_path / "report.csv").read_text().startswith("dtype,")
    for suite in ("logits", "linear"):
        for axis in ("vocab", "seq_len"):
            assert (tmp_path / f"{suite}_time_memory_vs_{axis}.png").read_bytes()[:4] == b"\x89PNG"
    assert "[4/4]" in capsys.readouterr().out  # progress is shown
    assert "| 16 | 300 | bfloat16 | **" in table  # the compact table: a cell per method at the point
    assert "| worst error vs float64 |" in table


def test_readme_block_is_replaced_with_the_summary_and_charts(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{report.README_START}\nold table\n{report.README_END}\nafter\n")
    chart = tmp_path / "results" / "logits_time_memory_vs_vocab.png"
    report.update_readme(readme, "new table\n", [chart])
    text = readme.read_text()
    assert "old table" not in text and "new table" in text
    assert "![logits_time_memory_vs_vocab](results/logits_time_memory_vs_vocab.png)" in text
    assert text.startswith("intro\n") and text.endswith(f"{report.README_END}\nafter\n")
    (tmp_path / "NOBLOCK.md").write_text("no markers")
    with pytest.raises(SystemExit, match="no <!-- benchmark-report:start -->"):
        report.update_readme(tmp_path / "NOBLOCK.md", "x", [])


def test_unknown_method_is_an_error(capsys):
    with pytest.raises(SystemExit):
        report.main(["--methods", "nonexistent"])
    assert "unknown or unavailable methods" in capsys.readouterr().err


def test_missing_peers_are_reported_not_dropped(monkeypatch, tmp_path, capsys):
    linear = SUITES["linear"]
    _, liger = linear.peers["liger-fused-linear-dpo"]
    peers = {**linear.peers, "liger-fused-linear-dpo": ("no_such_module_here", liger)}
    monkeypatch.setitem(SUITES, "linear", dataclasses.replace(linear, peers=peers))
    sizes = ["--vocabs", "50", "--seq-lens", "4", "--hidden", "4", "--dtypes", "float32", "--rounds", "1"]
    report.main(
        ["--suites", "linear", "--methods", "fastdpo-fused-linear-torch", *sizes, "--out", str(tmp_path)]
    )
    assert "missing: liger-fused-linear-dpo (no_such_module_here not installed)" in capsys.readouterr().err
    assert "Not measured (not installed here): liger-fused-linear-dpo" in (tmp_path / "report.md").read_text()
