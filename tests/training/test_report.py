"""OUT/report/ after a run (metrics.json with the curves, curves.png), and a multi-task classification run
whose held-out figures come per data set too; `training eval` prints the same."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from adapters import read_adapter_folder
from training.evaluate import evaluate_adapter
from training.output import TrainResult
from training.report import METRICS_FILE, PLOT_FILE, REPORT_FOLDER, moving_average
from training.runner import run_training
from tests.training.conftest import tiny_config

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
STEPS = 12
EVAL_EVERY = 4


@pytest.fixture(scope="module")
def two_sets(tmp_path_factory: pytest.TempPathFactory, sentiment_csv: Path) -> str:
    """The shared sentiment file plus a second file with a third label."""
    other = tmp_path_factory.mktemp("data") / "topics.csv"
    rows = ["text,label"] + ["the match ended in a draw,sport"] * 6 + ["a goal in the last minute,sport"] * 6 \
        + ["wonderful and moving,pos"] * 4 + ["boring and dull,neg"] * 4
    other.write_text("\n".join(rows) + "\n")
    return f"{sentiment_csv},{other}"


@pytest.fixture(scope="module")
def multi_run(tmp_path_factory: pytest.TempPathFactory, tiny_bert_dir: Path, two_sets: str) -> TrainResult:
    out = tmp_path_factory.mktemp("runs") / "multi"
    return run_training(tiny_config(tiny_bert_dir, two_sets, out, max_steps=STEPS, eval_every=EVAL_EVERY), progress=False)


def test_report_folder_holds_metrics_and_a_png(multi_run: TrainResult) -> None:
    report = multi_run.out / REPORT_FOLDER
    assert sorted(p.name for p in report.iterdir()) == [PLOT_FILE, METRICS_FILE]
    assert (report / PLOT_FILE).read_bytes().startswith(PNG_SIGNATURE)
    data = json.loads((report / METRICS_FILE).read_text())
    assert data["metrics"] == multi_run.manifest.metrics and data["labels"] == ["neg", "pos", "sport"]
    assert len(data["curves"]["train_loss"]) == STEPS
    validation = data["curves"]["validation"]
    assert [v["step"] for v in validation] == [4, 8, 12]
    assert {"loss", "accuracy", "f1_macro"} <= set(validation[0])


def test_report_leaves_the_adapter_folder_valid(multi_run: TrainResult) -> None:
    folder = read_adapter_folder(multi_run.out)  # checks the manifest's file hashes
    assert set(folder.manifest.files) == {"adapter_config.json", "adapter_model.safetensors"}


def test_multi_task_figures_per_data_set(multi_run: TrainResult, two_sets: str) -> None:
    metrics = multi_run.manifest.metrics
    by_data = metrics["held_out_by_data"]
    assert list(by_data) == ["sentiment.csv", "topics.csv"]
    assert sum(f["rows"] for f in by_data.values()) == metrics["held_out"]["rows"]
    for figures in by_data.values():
        assert {"accuracy", "precision_macro", "recall_macro", "f1_macro", "per_class", "confusion_matrix"} <= set(figures)
        assert figures["labels"] == ["neg", "pos", "sport"]
    assert metrics["train"]["validations"] == 3 and metrics["train"]["best_step"] in (4, 8, 12)
    assert multi_run.manifest.train_config["data"] == two_sets


def test_eval_prints_the_same_per_data_set_figures(multi_run: TrainResult) -> None:
    result = evaluate_adapter(multi_run.out)
    assert result["held_out"] == multi_run.manifest.metrics["held_out"]
    assert result["held_out_by_data"] == multi_run.manifest.metrics["held_out_by_data"]


def test_a_run_without_validation_still_plots(tmp_path: Path, tiny_bert_dir: Path, sentiment_csv: Path) -> None:
    result = run_training(tiny_config(tiny_bert_dir, sentiment_csv, tmp_path / "plain", max_steps=3,
                                      precision="bf16"), progress=False)
    report = result.out / REPORT_FOLDER
    assert (report / PLOT_FILE).read_bytes().startswith(PNG_SIGNATURE)
    assert json.loads((report / METRICS_FILE).read_text())["curves"]["validation"] == []
    assert result.manifest.metrics["train"]["precision"] == "bf16"


def test_moving_average() -> None:
    assert moving_average([2.0, 4.0, 6.0, 8.0], 2) == [2.0, 3.0, 5.0, 7.0]
    assert moving_average([], 3) == []


def test_the_report_is_part_of_the_atomic_adapter_folder(tmp_path: Path, tiny_bert_dir: Path, sentiment_csv: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A crash while the report is written leaves neither a new adapter without its report nor a half report:
    the adapter folder at OUT (report and all) stays the earlier run's."""
    import training.report

    out = tmp_path / "runs" / "adapter"
    first = run_training(tiny_config(tiny_bert_dir, sentiment_csv, out, max_steps=2), progress=False)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert Path(REPORT_FOLDER, METRICS_FILE) in before and Path(REPORT_FOLDER, PLOT_FILE) in before

    def broken_plot(*args, **kwargs) -> None:
        raise RuntimeError("plotting crashed")

    monkeypatch.setattr(training.report, "plot_curves", broken_plot)
    with pytest.raises(RuntimeError, match="plotting crashed"):
        run_training(tiny_config(tiny_bert_dir, sentiment_csv, out, max_steps=2, seed=1), progress=False)
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert read_adapter_folder(out).manifest.files == first.manifest.files  # hashes checked, the first run's
    assert sorted(p.name for p in out.parent.iterdir()) == ["adapter"]  # no temporary folder left behind

    with pytest.raises(RuntimeError, match="plotting crashed"):
        run_training(tiny_config(tiny_bert_dir, sentiment_csv, tmp_path / "new", max_steps=2), progress=False)
    assert not (tmp_path / "new").exists()
