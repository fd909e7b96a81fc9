from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from cohort.cli import main


def test_index_command_writes_the_index_and_prints_counts(
    lung1_archive: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["index", str(lung1_archive), "--out", str(tmp_path / "idx")]) == 0
    out = capsys.readouterr().out
    assert "251 files: 251 added" in out and "251 DICOM instances, 0 quarantined" in out
    assert len(pd.read_parquet(tmp_path / "idx" / "instances")) == 251
    assert main(["index", str(lung1_archive), "--out", str(tmp_path / "idx")]) == 0  # again: nothing read
    assert "251 unchanged (0 read)" in capsys.readouterr().out


def test_bad_spec_exits_2_with_the_reason(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = tmp_path / "bad.yaml"
    spec.write_text("archive: a\nstore: s\nexecutor:\n  kind: spark\n")
    assert main(["run", str(spec)]) == 2
    assert "executor.kind" in capsys.readouterr().err


@pytest.mark.slow
def test_run_command_prints_the_summary_and_a_read_line(
    prefect_server: str, demo_archive, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = tmp_path / "cohort.yaml"
    spec.write_text(
        f"archive: {demo_archive.root}\nstore: store\nexecutor:\n  kind: threads\n  n_workers: 2\n"
    )
    assert main(["run", str(spec)]) == 0
    out = capsys.readouterr().out
    assert "cases processed" in out
    line = next(x for x in out.splitlines() if "pd.read_parquet(" in x)
    table = line.split('pd.read_parquet("')[1].split('")')[0]
    assert len(pd.read_parquet(table)) == 4


def test_presets_command_lists_every_shipped_preset(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["presets"]) == 0
    names = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert names == [
        "ct-all-filters",
        "ct-filters",
        "ct-original",
        "mr-zscore",
        "mr-zscore-filters",
        "pet-suv",
    ]


def test_analysis_spec_paths_are_relative_to_the_file_and_errors_name_the_key(tmp_path: Path) -> None:
    from cohort.cli import load_analysis_spec
    from cohort.errors import SpecError

    spec = tmp_path / "analysis.yaml"
    spec.write_text("store: store\nclinical: data/clinical.csv\ntime: t\nevent: e\n")
    loaded = load_analysis_spec(spec)
    assert loaded.store == str(tmp_path / "store") and loaded.clinical == tmp_path / "data" / "clinical.csv"
    assert loaded.batch == "manufacturer" and loaded.combat.method == "parametric"
    spec.write_text("store: s\nclinical: c\ntime: t\nevent: e\ncombat:\n  method: bayes\n")
    with pytest.raises(SpecError, match=r"combat\.method"):
        load_analysis_spec(spec)
