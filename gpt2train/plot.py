"""`plot`: a run's curves in one figure, from its metrics.jsonl: train and eval loss against steps
and against tokens, the learning rate, tokens/s, the gradient norm, and the task scores when the
run logged any (else MFU). Several runs are overlaid, one colour each, with a legend.

matplotlib draws without a display (its Agg canvas; no pyplot, so no GUI backend is ever
chosen); PNG or SVG by the output's extension. It is an optional extra: pip install -e ".[plot]".
"""

from __future__ import annotations

import io
import json
import posixpath

import fsspec
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .errors import UserError

FORMATS = ("png", "svg")
CURVES = "curves.png"  # what a training run redraws at every evaluation (plot_every_eval)


def curves_path(model_path: str) -> str:
    return model_path.rstrip("/") + "/" + CURVES


def metrics_file(run: str) -> str:
    """A run's metrics.jsonl from a run directory (model_path), the file itself, or a JSON config."""
    fs, path = fsspec.core.url_to_fs(run)
    if path.endswith(".jsonl"):
        found = path
    elif path.endswith(".json") and fs.isfile(path):
        from .config import load_config
        return metrics_file(load_config(run).model_path)
    else:
        found = posixpath.join(path, "metrics.jsonl")
    if not fs.isfile(found):
        raise UserError(f"no metrics in {run}: give a run's model_path (holding metrics.jsonl), the metrics.jsonl "
                        "file or the run's JSON config")
    return fs.unstrip_protocol(found) if "://" in run else found


def read_records(metrics_path: str) -> list[dict]:
    with fsspec.open(metrics_path, "r", encoding="utf-8") as f:
        lines = f.read().splitlines()
    records = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line cut short by a kill: the rest of the file is still worth drawing
        if isinstance(record, dict) and isinstance(record.get("step"), (int, float)):
            records.append(record)
    return records


def run_names(runs: list[str]) -> list[str]:
    """Legend labels: each run directory's name, with as many parent directories as make them differ."""
    parts = [[p for p in metrics_file_dir(r).split("/") if p] for r in runs]
    for depth in range(1, max(len(p) for p in parts) + 1):
        names = ["/".join(p[-depth:]) for p in parts]
        if len(set(names)) == len(names):
            return names
    return [f"{name} ({i})" for i, name in enumerate(names)]


def metrics_file_dir(run: str) -> str:
    return run[: -len("/metrics.jsonl")] if run.endswith("/metrics.jsonl") else run.rstrip("/")


def _series(records: list[dict], key: str, x: str = "step") -> tuple[list, list]:
    points = [(r[x], r[key]) for r in records if isinstance(r.get(key), (int, float)) and r.get(x) is not None]
    points.sort(key=lambda p: p[0])
    return [p[0] for p in points], [p[1] for p in points]


def _with_tokens(records: list[dict]) -> list[dict]:
    """Every record with a token count: its own, or its step times the run's tokens per step
    (evaluation records, the first step's, runs written before tokens were logged: nothing)."""
    rates = [r["tokens"] / r["step"] for r in records if r.get("tokens") and r.get("step")]
    if not rates:
        return records
    rate = sorted(rates)[len(rates) // 2]
    return [r if "tokens" in r else {**r, "tokens": r["step"] * rate} for r in records]


def figure(runs: list[tuple[str, list[dict]]]) -> Figure:
    """The figure of one or more runs: (legend name, metrics records) each."""
    fig = Figure(figsize=(15, 8.4), dpi=100)
    FigureCanvasAgg(fig)
    # Fixed margins: matplotlib's automatic layouts measure every label in an extra drawing pass
    # (twice the time of a save, measured), and this figure is redrawn at every evaluation.
    fig.subplots_adjust(left=0.05, right=0.985, bottom=0.07, top=0.91, wspace=0.2, hspace=0.3)
    axes = fig.subplots(2, 3).ravel()
    tasks = sorted({k for _, recs in runs for r in recs for k in r if k.startswith("task_")})
    titles = ["loss against steps", "loss against tokens", "learning rate", "tokens/s", "gradient norm",
              "task scores" if tasks else "model FLOPs utilisation"]
    for ax, title in zip(axes, titles):
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
    for i, (name, records) in enumerate(runs):
        color = f"C{i % 10}"
        records = _with_tokens(records)
        for ax, x in ((axes[0], "step"), (axes[1], "tokens")):
            ax.plot(*_series(records, "loss", x), color=color, label=f"{name} train")
            ex, ey = _series(records, "eval_loss", x)
            if ex:
                ax.plot(ex, ey, color=color, linestyle="--", marker="o", markersize=3, label=f"{name} eval")
        axes[2].plot(*_series(records, "lr"), color=color, label=name)
        axes[3].plot(*_series(records, "tokens_per_s"), color=color, label=name)
        axes[4].plot(*_series(records, "grad_norm"), color=color, label=name)
        if tasks:
            styles = ["-", "--", ":", "-."]
            for j, key in enumerate(tasks):
                tx, ty = _series(records, key)
                if tx:
                    axes[5].plot(tx, ty, color=color, linestyle=styles[j % len(styles)], marker="o", markersize=3,
                                 label=f"{name} {key.removeprefix('task_')}")
        else:
            axes[5].plot(*_series(records, "mfu"), color=color, label=name)
    for ax, xlabel in zip(axes, ("step", "tokens", "step", "step", "step", "step")):
        ax.set_xlabel(xlabel)
    axes[0].set_ylabel("loss (nats/token)")
    axes[0].legend(fontsize="small")
    if tasks:
        axes[5].legend(fontsize="small")
    if not tasks:
        axes[5].yaxis.set_major_formatter(lambda v, _pos: f"{v:.0%}")
    fig.suptitle("training curves: " + ", ".join(name for name, _ in runs))
    return fig


def save(fig: Figure, out: str) -> None:
    ext = out.rsplit(".", 1)[-1].lower() if "." in out.rsplit("/", 1)[-1] else ""
    if ext not in FORMATS:
        raise UserError(f"--out {out}: the figure is written as PNG or SVG, chosen by the extension (.png, .svg)")
    buffer = io.BytesIO()
    fig.savefig(buffer, format=ext)
    fs, path = fsspec.core.url_to_fs(out)
    parent = posixpath.dirname(path)
    if parent:
        fs.makedirs(parent, exist_ok=True)
    with fs.open(path + ".tmp", "wb") as f:  # then a rename: a viewer never sees half a file
        f.write(buffer.getvalue())
    fs.mv(path + ".tmp", path)


def plot_runs(runs: list[str], out: str, names: list[str] | None = None) -> Figure:
    """Draw the runs (directories, metrics.jsonl files or configs) into `out` (.png or .svg)."""
    files = [metrics_file(r) for r in runs]
    names = names or run_names(files)
    data = []
    for run, path, name in zip(runs, files, names):
        records = read_records(path)
        if not records:
            raise UserError(f"{path} holds no metrics yet: train for at least one step first")
        data.append((name, records))
    fig = figure(data)
    save(fig, out)
    return fig
