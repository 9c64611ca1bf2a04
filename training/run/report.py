"""A run's report: curves per epoch and a confusion matrix per dataset as PNGs, and a
per-class accuracy table. Training writes it at its end; without Ray, any time later:

    metatrainer report ./runs/digits                  # PNGs into ./runs/digits/report/
    metatrainer report s3://bucket/runs/digits --out ./digits-report --split val

The curves come from the history every checkpoint keeps (one record per finished epoch, carried
over on resume). The command scores the newest checkpoint on the split for the matrices;
training plots the test split's, which its workers counted in their last pass and saved as
RUN/report/confusion-test.json.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cluster import storage
from cluster.errors import UserError
from training.config import TrainConfig

if TYPE_CHECKING:  # torch and matplotlib load when a report is made, not with the CLI
    import torch
    from matplotlib.figure import Figure

CURVES_FILE = "curves.png"
LABELLED_CLASSES = 40
"""Up to this many classes a confusion matrix names every class on its axes and shows counts."""


@dataclass
class DatasetConfusion:
    """One head's confusion matrix on a split: counts [true class, predicted class]."""

    name: str
    classes: list[str]
    counts: torch.Tensor

    def rows(self) -> list[tuple[str, int, int]]:
        """(class, correct, total) per class."""
        correct, total = self.counts.diagonal().tolist(), self.counts.sum(dim=1).tolist()
        return list(zip(self.classes, correct, total, strict=True))


def write_report(
    run: str,
    out: str | None = None,
    split: str = "test",
    loader_workers: int = 2,
    scored: bool = False,
) -> tuple[list[str], list[DatasetConfusion]]:
    """Score the run's newest checkpoint on `split` and write the PNGs into `out` (default
    RUN/report). `scored`: plot the test split's matrices the workers saved at the end of
    training instead (training's own report: no second pass over the split). Returns the
    files written and the matrices."""
    from training.model.checkpoint import find_checkpoint, load_state
    from training.run.evaluate import (
        REPORT_DIR,
        TEST_CONFUSIONS,
        checkpoint_confusions,
        load_confusions,
    )

    run = storage.normalize(run)
    if not storage.list_dir(run):
        raise UserError(
            f"{run}: no such run directory; give the STORAGE/NAME of a `metatrainer train` run"
        )
    if scored:
        state = load_state(find_checkpoint(run))
        names, classes, matrices = load_confusions(storage.join(run, REPORT_DIR, TEST_CONFUSIONS))
        split = "test"
    else:
        from training.run.loop import dataset_labels  # imports Ray's modules; starts no Ray

        state, matrices = checkpoint_confusions(run, split, loader_workers)
        names, classes = (
            dataset_labels(TrainConfig.from_dict(state.config).data.datasets),
            state.classes,
        )
    confusions = [DatasetConfusion(*c) for c in zip(names, classes, matrices, strict=True)]
    out = storage.join(run, REPORT_DIR) if out is None else storage.normalize(out)
    files = [storage.join(out, CURVES_FILE)]
    storage.write_bytes(files[0], plot_curves(state.position.history, names))
    for c in confusions:
        files.append(storage.join(out, f"confusion-{_file_name(c.name)}.png"))
        storage.write_bytes(files[-1], plot_confusion(c, split))
    return files, confusions


def per_class_table(confusions: list[DatasetConfusion], split: str) -> str:
    """Per dataset: class, correct, total, accuracy on the split, then the dataset's total."""
    lines = []
    for c in confusions:
        width = max([len("class"), *(len(k) for k in c.classes)])
        lines += [f"{c.name} ({split})", f"{'class':<{width}} {'correct':>8} {'total':>8} accuracy"]
        for name, correct, total in c.rows():
            lines.append(f"{name:<{width}} {correct:>8} {total:>8} {_ratio(correct, total)}")
        correct, total = int(c.counts.trace()), int(c.counts.sum())
        lines += [f"{'all':<{width}} {correct:>8} {total:>8} {_ratio(correct, total)}", ""]
    return "\n".join(lines).rstrip() + "\n"


def plot_curves(history: list[dict], names: list[str]) -> bytes:
    """Loss terms, validation accuracy per dataset and throughput per epoch, as one PNG."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 7.5), layout="constrained")
    losses, penalty, accuracy, speed = fig.subplots(2, 2).flat
    epochs = [r["epoch"] for r in history]
    losses.plot(epochs, [r["loss"] for r in history], "o-", label="loss")
    losses.plot(epochs, [r["cross_entropy"] for r in history], "s--", label="cross-entropy")
    _axes(losses, "training loss", "mean per step", legend=True)
    penalty.plot(epochs, [r["meta_penalty"] for r in history], "o-", color="tab:purple")
    _axes(penalty, "meta penalty (adapters; 0 without)", "mean per step")
    for name in names:
        # Histories written before the per-dataset record have the mean only.
        values = [r.get("val_accuracy_per_dataset", {}).get(name) for r in history]
        if any(v is not None for v in values):
            accuracy.plot(epochs, [_nan(v) for v in values], "o-", label=name)
    if not accuracy.lines:
        accuracy.plot(epochs, [_nan(r.get("val_accuracy")) for r in history], "o-", label="mean")
    accuracy.set_ylim(0, 1)
    _axes(accuracy, "validation accuracy", "accuracy", legend=True)
    speed.plot(epochs, [r["samples_per_second"] for r in history], "o-", color="tab:green")
    speed.set_ylim(bottom=0)
    _axes(speed, "throughput (all workers)", "images / s")
    if not history:
        fig.suptitle("no finished epoch yet")
    return _png(fig)


def plot_confusion(c: DatasetConfusion, split: str) -> bytes:
    """Row-normalised colours (each true class sums to 1), counts written in the cells."""
    import torch
    from matplotlib.figure import Figure

    k = len(c.classes)
    side = min(max(5.0, 0.35 * k + 2.5), 30.0)
    fig = Figure(figsize=(side + 1.5, side), layout="constrained")
    ax = fig.subplots()
    totals = c.counts.sum(dim=1, keepdim=True).clamp(min=1)
    image = ax.imshow((c.counts / totals).numpy(), cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, label="share of the true class", shrink=0.8)
    if k <= LABELLED_CLASSES:
        ax.set_xticks(range(k), c.classes, rotation=90)
        ax.set_yticks(range(k), c.classes)
        for (t, p), n in zip(torch.cartesian_prod(*[torch.arange(k)] * 2).tolist(),
                             c.counts.flatten().tolist(), strict=True):  # fmt: skip
            if n:
                dark = n / float(totals[t]) > 0.5
                ax.text(p, t, n, ha="center", va="center", fontsize=7,
                        color="white" if dark else "black")  # fmt: skip
    correct, total = int(c.counts.trace()), int(c.counts.sum())
    ax.set_title(f"{c.name}: {split} accuracy {_ratio(correct, total).strip()} ({correct}/{total})")
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    return _png(fig)


def _axes(ax, title: str, ylabel: str, legend: bool = False) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.set_title(title)
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    if legend:
        ax.legend()


def _png(fig: Figure) -> bytes:
    """Rendered by Agg explicitly: no display, no pyplot state shared between threads."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def _nan(value: float | None) -> float:
    return float("nan") if value is None else value


def _ratio(correct: int, total: int) -> str:
    return f"{correct / total:8.4f}" if total else "     n/a"


def _file_name(label: str) -> str:
    """A dataset label (`a/flowers`) as a file name part (`a-flowers`)."""
    return "".join(ch if ch.isalnum() or ch in "._" else "-" for ch in label)
