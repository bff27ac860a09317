"""`plot` draws real runs: one panel per figure of the run, every panel showing every run in its own
colour; and a training run redraws model_path/curves.png at each evaluation."""

import json
import shutil

import numpy as np
import pytest

matplotlib = pytest.importorskip("matplotlib")
from matplotlib.colors import to_rgb  # noqa: E402
from matplotlib.image import imread  # noqa: E402

from conftest import tiny_config  # noqa: E402
from gpt2train.cli import guarded, run_main  # noqa: E402
from gpt2train.plot import plot_runs  # noqa: E402
from gpt2train.train import Trainer  # noqa: E402


@pytest.fixture(scope="module")
def runs(tmp_path_factory, gpt2_tokenizer):
    paths = []
    for name, lr in (("fast", 3e-3), ("slow", 3e-4)):
        tmp = tmp_path_factory.mktemp(name)
        cfg = tiny_config(tmp, model_path=str(tmp / name), lr=lr, max_steps=6, train_steps=3, iterations=2)
        Trainer(cfg, gpt2_tokenizer, progress=False, log=lambda *a, **k: None).run()
        paths.append(cfg.model_path)
    return paths


def pixels_of(image, ax, color, fig) -> int:
    """How many pixels inside the panel `ax` have the colour `color` (antialiasing aside)."""
    x0, y0, x1, y1 = ax.get_window_extent().extents
    height = image.shape[0]
    panel = image[int(height - y1):int(height - y0), int(x0):int(x1), :3]
    return int((np.abs(panel - np.array(to_rgb(color))).max(axis=-1) < 0.08).sum())


def test_plot_overlays_runs_one_line_each_on_every_panel(runs, tmp_path, capsys):
    out = tmp_path / "both.png"
    assert run_main(["plot", *runs, "--out", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    fig = plot_runs(runs, str(tmp_path / "again.png"))
    image = imread(out)
    assert image.shape[:2] == (840, 1500)
    axes = fig.axes
    assert [ax.get_title() for ax in axes] == ["loss against steps", "loss against tokens", "learning rate",
                                               "tokens/s", "gradient norm", "model FLOPs utilisation"]
    for ax in axes[2:]:
        assert [line.get_label() for line in ax.get_lines()] == ["fast", "slow"]  # one line per run
    for ax in axes[:2]:  # train and eval loss of each run
        assert [line.get_label() for line in ax.get_lines()] == ["fast train", "fast eval", "slow train", "slow eval"]
    for ax in axes:  # every panel shows both runs, each in its colour, in the PNG itself
        assert pixels_of(image, ax, "C0", fig) > 30 and pixels_of(image, ax, "C1", fig) > 30, ax.get_title()
    # The losses drawn are the runs' own: the last eval point of the fast run is its metrics' last eval_loss.
    evals = [json.loads(line)["eval_loss"] for line in open(runs[0] + "/metrics.jsonl") if "eval_loss" in line]
    assert list(axes[0].get_lines()[1].get_ydata()) == evals
    tokens = axes[1].get_lines()[0].get_xdata()
    assert tokens[-1] == 6 * 4 * 32  # steps x batch x context


def test_training_redraws_curves_png_and_svg_by_extension(runs, tmp_path):
    image = imread(runs[0] + "/curves.png")
    assert image.shape[:2] == (840, 1500) and image[..., :3].std() > 0.05
    svg = tmp_path / "curves.svg"
    assert run_main(["plot", runs[1], "--out", str(svg)]) == 0
    assert svg.read_text().lstrip().startswith(("<?xml", "<svg")) and "</svg>" in svg.read_text()


def test_task_scores_get_their_panel(runs, tmp_path):
    run = tmp_path / "tasks"
    shutil.copytree(runs[0], run)
    with open(run / "metrics.jsonl", "a") as f:
        for step, score in ((3, 0.25), (6, 0.31)):
            f.write(json.dumps({"step": step, "task_hellaswag_acc_norm": score, "task_lambada_acc": score / 2}) + "\n")
    fig = plot_runs([str(run)], str(tmp_path / "tasks.png"))
    panel = fig.axes[5]
    assert panel.get_title() == "task scores"
    assert sorted(line.get_label() for line in panel.get_lines()) == ["tasks hellaswag_acc_norm", "tasks lambada_acc"]


def test_plot_errors_are_one_line(runs, tmp_path, capsys):
    assert guarded(run_main, ["plot", runs[0], "--out", str(tmp_path / "x.jpg")]) == 2
    assert "PNG or SVG" in capsys.readouterr().err
    assert guarded(run_main, ["plot", str(tmp_path / "nothing"), "--out", str(tmp_path / "x.png")]) == 2
    assert "no metrics in" in capsys.readouterr().err
