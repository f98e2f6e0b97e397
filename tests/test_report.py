"""The benchmark report runs end to end on a tiny sweep and writes every output."""

import json

import pytest

from benchmarks import report


def test_report_writes_rows_tables_and_charts(tmp_path, capsys):
    code = report.main(
        ["--methods", "reference", "fastdpo-torch", "unfused-reference", "fastdpo-fused-linear-torch",
         "--vocabs", "300", "--seq-lens", "16", "--hidden", "8", "--dtypes", "bfloat16", "--rounds", "2",
         "--out", str(tmp_path)]
    )  # fmt: skip
    assert code == 0
    data = json.loads((tmp_path / "report.json").read_text())
    assert {"timestamp", "cpu", "cpu_features", "versions"} <= set(data["machine"])
    rows = {(r["suite"], r["method"]): r for r in data["rows"]}
    assert set(rows) == {
        ("logits", "reference"), ("logits", "fastdpo-torch"),
        ("linear", "unfused-reference"), ("linear", "fastdpo-fused-linear-torch"),
    }  # fmt: skip
    assert rows["logits", "reference"]["speedup_vs_baseline"] == 1.0
    assert rows["linear", "unfused-reference"]["speedup_vs_baseline"] == 1.0
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
    from benchmarks import linear_methods

    monkeypatch.setattr(
        linear_methods, "missing_methods", lambda: ["liger-fused-linear-dpo (liger_kernel not installed)"]
    )
    report.main(["--suites", "linear", "--methods", "fastdpo-fused-linear-torch", "--vocabs", "50", "--seq-lens", "4",
                 "--hidden", "4", "--dtypes", "float32", "--rounds", "1", "--out", str(tmp_path)])  # fmt: skip
    assert "missing: liger-fused-linear-dpo" in capsys.readouterr().err
    assert "Not measured (not installed here): liger-fused-linear-dpo" in (tmp_path / "report.md").read_text()
