"""What every task's report shares: eval.json (`start_report`), a figure saved into the write gate's staging
folder (`save_figure`, `figure_png`), a number as the summaries print it (`fmt`), a label cut to fit a plot
(`short`), the confusion-matrix drawing (classification and segmentation), and the training curves drawn from
metrics.jsonl. Each task's own plots and printed summary are in its reports module (trainer/tasks/*_reports.py);
importing this module first sets matplotlib's headless backend for them.

Everything here only reads what it is given and writes files.
"""
from __future__ import annotations

import functools
import io
import json
import math
from pathlib import Path
from typing import NamedTuple, Optional, Sequence

import matplotlib

matplotlib.use("Agg")  # reports are written on headless nodes; never try to open a window

import matplotlib.pyplot as plt  # noqa: E402  (must come after matplotlib.use)
import numpy as np  # noqa: E402
from matplotlib import font_manager  # noqa: E402
from matplotlib.ticker import EngFormatter  # noqa: E402
from PIL import Image, ImageDraw, ImageFont  # noqa: E402

from trainer.metrics import is_number  # noqa: E402

DPI = 100
CM_NUMBERS_MAX_CLASSES = 30  # above this, per-cell numbers become unreadable
LABEL_MAX_CHARS = 20  # long class names would squeeze the plot area to nothing


# ---------------------------------------------------------------------------------------------- confusion matrix

def row_normalise(cm) -> np.ndarray:
    """Each row divided by its sum, so a cell reads "fraction of this true class"; an all-zero row (a class
    absent from the split) stays zeros instead of becoming NaN."""
    counts = np.asarray(cm, dtype=float)
    sums = counts.sum(axis=-1, keepdims=True)
    return np.divide(counts, sums, out=np.zeros_like(counts), where=sums > 0)


def plot_confusion_matrix(cm: list[list[int]], classes: list[str], path: Path) -> None:
    """Counts and row-normalised confusion matrix side by side; rows are the true class, columns the prediction."""
    counts = np.asarray(cm, dtype=float).reshape(len(classes), len(classes))
    n = len(classes)
    side = min(max(4.5, 0.28 * n + 2.5), 16.0)  # inches per panel: grows with the class count, then caps
    fig, axes = plt.subplots(1, 2, figsize=(2 * side + 2, side + 1), layout="constrained")
    texts = _draw_matrix(axes[0], counts, classes, side, "Counts", "{:.0f}")
    texts += _draw_matrix(axes[1], row_normalise(counts), classes, side, "Row-normalised (fraction of true class)",
                          "{:.2f}", vmax=1.0)
    save_figure(fig, path, texts)


def _draw_matrix(ax, values: np.ndarray, classes: list[str], side: float, title: str, cell: str,
                 vmax: Optional[float] = None) -> list:
    """The panel, and its cell numbers as `CellText`s (drawn on its pixels by `figure_png`)."""
    n = len(classes)
    top = vmax if vmax is not None else max(float(values.max(initial=0)), 1.0)
    image = ax.imshow(values, cmap="Blues", vmin=0, vmax=top, interpolation="nearest")
    ax.figure.colorbar(image, ax=ax, shrink=0.8)
    ax.set_title(title)
    ax.set_xlabel("Predicted class")
    ax.set_ylabel("True class")
    _set_class_ticks(ax, classes, side)
    if n > CM_NUMBERS_MAX_CLASSES:
        return []
    size = 10 if n <= 10 else 7
    # dark cells get white text so the number stays legible on either end of the colour map
    return [CellText(ax, j, i, cell.format(v), "white" if v > top / 2 else "black", size)
            for (i, j), v in np.ndenumerate(values)]


def _set_class_ticks(ax, classes: list[str], side: float) -> None:
    n = len(classes)
    step = max(1, math.ceil(n / 80))  # past ~80 labels they overlap even at the smallest font: label every k-th
    ticks = np.arange(0, n, step)
    names = [short(classes[i]) for i in ticks]
    size = float(np.clip(0.4 * side * 72 / len(ticks), 5, 10))  # a fraction of the row height, in points
    longest = max((len(s) for s in names), default=0)
    rotation = 0 if n <= 4 and longest <= 8 else 90 if n > 30 else 45
    ax.set_xticks(ticks, names, rotation=rotation, ha="right" if rotation == 45 else "center",
                  rotation_mode="anchor" if rotation == 45 else "default", fontsize=size)
    ax.set_yticks(ticks, names, fontsize=size)


def short(name: str, limit: int = LABEL_MAX_CHARS) -> str:
    return name if len(name) <= limit else name[: limit - 1] + "…"


# ------------------------------------------------------------------------------------------- training curves

# keys of a train row that are not the loss or one of its parts
_TRAIN_BOOKKEEPING = {"type", "step", "epoch", "samples_seen", "lr", "throughput", "loss"}
# the eval metric drawn in the middle panel: the first a row has (classification, segmentation, detection)
_HEADLINE = ("accuracy", "miou", "map")


def plot_training_curves(metrics_jsonl: Path) -> Optional[bytes]:
    """Loss (and every logged part of it), the eval headline metric and the learning rate against samples seen,
    as a PNG; None if there is no data."""
    rows = _read_jsonl(Path(metrics_jsonl))
    train = [r for r in rows if r.get("type") == "train"]
    evals = [r for r in rows if r.get("type") == "eval"]
    if not train and not evals:
        return None
    splits = sorted({str(r.get("split", "eval")) for r in evals})
    fig, (ax_loss, ax_acc, ax_lr) = plt.subplots(1, 3, figsize=(15, 4.2), sharex=True, layout="constrained")
    _plot_series(ax_loss, train, "loss", "train loss", lw=1.0)
    parts = sorted({k for r in train for k, v in r.items() if k not in _TRAIN_BOOKKEEPING and isinstance(v, float)})
    for part in parts:  # e.g. a detector's loss_classifier, loss_box_reg, ...
        _plot_series(ax_loss, train, part, part, lw=0.8)
    headline = next((m for m in _HEADLINE if any(m in r for r in evals)), "accuracy")
    for split in splits:
        split_rows = [r for r in evals if str(r.get("split", "eval")) == split]
        _plot_series(ax_loss, split_rows, "loss", f"{split} loss", marker="o")
        _plot_series(ax_acc, split_rows, headline, f"{split} {headline}", marker="o")
    _plot_series(ax_lr, train, "lr", "learning rate", lw=1.0)
    for ax, title in ((ax_loss, "Loss"), (ax_acc, f"Eval {headline}"), (ax_lr, "Learning rate")):
        _finish_axis(ax, title)
    return figure_png(fig)


def _read_jsonl(path: Path) -> list[dict]:
    """The parseable JSON objects in the file; a torn last line (a run killed mid-write) is just skipped."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def _latest_history(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """A resumed run appends rows starting from its checkpoint again; when samples_seen goes back, the newer
    rows replace the older ones from that point on, so the line does not zigzag."""
    kept: list[tuple[float, float]] = []
    for x, y in points:
        while kept and kept[-1][0] >= x:
            kept.pop()
        kept.append((x, y))
    return kept


def _plot_series(ax, rows: list[dict], key: str, label: str, **style) -> None:
    points = _latest_history([(r["samples_seen"], r[key]) for r in rows
                              if is_number(r.get("samples_seen"), finite=True) and is_number(r.get(key), finite=True)])
    if points:
        xs, ys = zip(*points)
        ax.plot(xs, ys, label=label, **style)


def _finish_axis(ax, title: str) -> None:
    ax.set_title(title)
    ax.set_xlabel("Samples seen")
    ax.xaxis.set_major_formatter(EngFormatter())  # 1.2M rather than 1200000 or an offset label
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=9)
    else:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="grey")


# ------------------------------------------------------------------------------------------ report files

def start_report(out_dir, metrics: dict, name: str) -> Path:
    """A report's first step, into a staging folder of the write gate: eval.json (before any plot: the numbers,
    which took the whole evaluation, are there even if a plot fails); returns the plots folder (not yet made)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / name).write_text(json.dumps(_to_plain(metrics), indent=1, default=str) + "\n")
    return out_dir / "plots"


def _to_plain(obj):
    """numpy scalars and arrays (and tuples) as plain Python, so json writes numbers rather than strings."""
    if isinstance(obj, dict):
        return {str(k): _to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_plain(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _to_plain(obj.tolist())
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    return obj


class CellText(NamedTuple):
    """A short text centred on (x, y) in `ax`'s data coordinates, `points` high: what a plot has hundreds of
    (the confusion matrix's cell numbers), drawn by `figure_png` onto the figure's pixels with PIL in the
    figure's own font rather than as matplotlib Text artists (882 of them, for 21 classes, were ~0.8 s of the
    matrix's ~1.25 s). Not part of the layout, as the artists were not (set_in_layout(False))."""
    ax: object
    x: float
    y: float
    text: str
    colour: str
    points: float


def figure_png(fig, texts: Sequence[CellText] = ()) -> bytes:
    """The figure, with `texts` over it, as PNG bytes, cropped to its artists plus savefig's pad as
    `bbox_inches="tight"` crops it, and closed (pyplot keeps every open figure alive: long eval loops would
    leak)."""
    try:
        # Drawn once on the figure's Agg canvas and cropped here: savefig with a layout engine or a tight bbox
        # draws the whole figure twice (a dry pass, then the real one), which was ~20% of a plot's time (the
        # 21-class confusion matrix 1.5 s -> 1.3 s, the overlay grid 1.0 s -> 0.8 s; the plots are most of our
        # end-to-end fixed cost against torchvision's reference scripts, BENCHMARKS.md "vs_reference")
        fig.set_dpi(DPI)
        fig.canvas.draw()
        box = fig.get_tightbbox(fig.canvas.get_renderer())  # inches, from the bottom left
        width, height = fig.get_size_inches()
        if box.x0 >= 0 and box.y0 >= 0 and box.x1 <= width and box.y1 <= height:
            rgb = np.asarray(fig.canvas.buffer_rgba())[..., :3]  # the facecolour is opaque: alpha is all 255
            if texts:
                rgb = _draw_texts(rgb, texts)
            pad = plt.rcParams["savefig.pad_inches"]  # inches, as savefig's tight box pads
            rows, cols = rgb.shape[:2]
            # pixel edges of the padded box; where the pad reaches past the canvas it is filled with the facecolour
            top, bottom = round((height - box.y1 - pad) * DPI), round((height - box.y0 + pad) * DPI)
            left, right = round((box.x0 - pad) * DPI), round((box.x1 + pad) * DPI)
            inside = rgb[max(0, top):min(rows, bottom), max(0, left):min(cols, right)]
            face = np.rint(np.asarray(fig.get_facecolor()[:3]) * 255).astype(np.uint8)
            grown = np.empty((bottom - top, right - left, 3), dtype=np.uint8)
            grown[:] = face
            grown[max(0, -top):max(0, -top) + inside.shape[0], max(0, -left):max(0, -left) + inside.shape[1]] = inside
            return png_bytes(grown)
        # an artist beyond the figure's edge (a legend beside the axes): savefig grows the image to the box (given,
        # not "tight", which would measure it again); the texts as artists, which it draws with the rest
        for t in texts:
            t.ax.text(t.x, t.y, t.text, ha="center", va="center", fontsize=t.points, color=t.colour,
                      clip_on=False).set_in_layout(False)
        png = io.BytesIO()
        fig.savefig(png, dpi=DPI, format="png", bbox_inches=box.padded(plt.rcParams["savefig.pad_inches"]),
                    pil_kwargs={"compress_level": 1})
        return png.getvalue()
    finally:
        plt.close(fig)


def _draw_texts(rgb: np.ndarray, texts: Sequence[CellText]) -> np.ndarray:
    """`texts` drawn onto a copy of the whole canvas's pixels (display coordinates: from the bottom left)."""
    picture = Image.fromarray(np.ascontiguousarray(rgb))
    draw = ImageDraw.Draw(picture)
    for t in texts:
        x, y = t.ax.transData.transform((t.x, t.y))
        draw.text((x, picture.height - y), t.text, fill=t.colour, font=_font(t.points), anchor="mm")
    return np.asarray(picture)


@functools.lru_cache(maxsize=8)
def _font(points: float):
    """matplotlib's default font (DejaVu Sans, shipped with it) at `points`, as PIL draws it at DPI."""
    return ImageFont.truetype(font_manager.findfont(font_manager.FontProperties()), points * DPI / 72)


def png_bytes(rgb: np.ndarray) -> bytes:
    """(H, W, 3) uint8 pixels as PNG bytes, at zlib level 1, not PIL's default 6: the same pixels, files ~15%
    larger, and encoding was ~half of a plot's time (the overlay grid: 4.0 s -> 2.2 s)."""
    png = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb)).save(png, format="png", compress_level=1)
    return png.getvalue()


# ------------------------------------------------------------------------------------------- picture grids

GRID_TITLE_POINTS = 9  # the panel titles' size, as the matplotlib grids these replace had them
GRID_MARGIN_PX = 8  # around each panel


def panel_grid(rows: list, cell_px: int) -> np.ndarray:
    """Rows of (title, (H, W, 3) uint8 picture) panels as one RGB picture on white: each picture scaled to fit a
    `cell_px` square (aspect kept, centred) under its title. Composed with PIL, not as matplotlib axes: a grid of
    8 x 3 axes cost ~0.8 s, most of it building the axes (the overlay grids of every segmentation and detection
    report: BENCHMARKS.md "vs_reference")."""
    font = _font(GRID_TITLE_POINTS)
    title_px = round(1.6 * font.size)
    columns = max((len(row) for row in rows), default=0)
    step_x, step_y = cell_px + 2 * GRID_MARGIN_PX, title_px + cell_px + 2 * GRID_MARGIN_PX
    grid = Image.new("RGB", (columns * step_x, len(rows) * step_y), "white")
    draw = ImageDraw.Draw(grid)
    for r, row in enumerate(rows):
        for c, (title, picture) in enumerate(row):
            panel = Image.fromarray(np.ascontiguousarray(picture))
            scale = cell_px / max(panel.width, panel.height)
            panel = panel.resize((max(1, round(panel.width * scale)), max(1, round(panel.height * scale))),
                                 Image.Resampling.BILINEAR)
            x, y = c * step_x + GRID_MARGIN_PX, r * step_y + GRID_MARGIN_PX
            draw.text((x + cell_px // 2, y + title_px // 2), title, fill="black", font=font, anchor="mm")
            grid.paste(panel, (x + (cell_px - panel.width) // 2, y + title_px + (cell_px - panel.height) // 2))
    return np.asarray(grid)


def save_pixels(rgb: np.ndarray, path: Path) -> None:
    """(H, W, 3) uint8 pixels as a PNG into a staging folder of the write gate, which places it whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png_bytes(rgb))


def save_figure(fig, path: Path, texts: Sequence[CellText] = ()) -> None:
    """A plot into a staging folder of the write gate, which places it whole (never half a PNG)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(figure_png(fig, texts))


def fmt(value) -> str:
    """A metric as the printed summaries show it: n/a, an integer, or 4 decimals."""
    if value is None:
        return "n/a"
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return f"{float(value):.4f}"
    return str(value)
