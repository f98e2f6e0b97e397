"""The benchmark report runs end to end on a tiny sweep and writes every output."""

import json

from benchmarks import report


def test_report_writes_rows_table_and_charts(tmp_path, capsys):
    code = report.main(
        ["--methods", "reference", "fastdpo-torch", "--vocabs", "300", "--seq-lens", "16",
         "--dtypes", "bfloat16", "--rounds", "2", "--out", str(tmp_path)]
    )  # fmt: skip
    assert code == 0
    data = json.loads((tmp_path / "report.json").read_text())
    assert {"timestamp", "cpu", "versions"} <= set(data["machine"])
    rows = {r["method"]: r for r in data["rows"]}
    assert set(rows) == {"reference", "fastdpo-torch"}
    assert rows["reference"]["speedup_vs_reference"] == 1.0
    assert len(rows["fastdpo-torch"]["times"]) == 2
    assert rows["fastdpo-torch"]["max_abs_error"] < 1e-3
    table = (tmp_path / "report.md").read_text()
    assert "| 16 | 300 | bfloat16 | fastdpo-torch |" in table
    assert (tmp_path / "report.csv").read_text().startswith("dtype,")
    for name in ("time_memory_vs_vocab.png", "time_memory_vs_seq_len.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
    assert "[2/2]" in capsys.readouterr().out  # progress is shown


def test_unknown_method_is_an_error(capsys):
    import pytest

    with pytest.raises(SystemExit):
        report.main(["--methods", "nonexistent"])
    assert "unknown or unavailable methods" in capsys.readouterr().err
