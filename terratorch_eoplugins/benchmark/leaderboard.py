"""Render a sweep's results CSV as a Markdown leaderboard (LIANet supplement, table 3 layout) and a PNG plot.

Layout of table 3 ("Task | Model / Setting | # Tunable Params (M) | IoU | ACC | F1", all macro): one table per
label fraction and task kind, rows grouped by task; one row per model whose settings are joined with ``/`` as in
"TerraMind-base (Full/Frozen/Embedding) | 102/15.5/0.39 | 0.26/0.23/0.24 | ...". Regression tasks use
RMSE/MAE/r. Values are means over seeds (``mean±std`` when there are several). In each task and metric column
the **top three** values are bold (lowest RMSE/MAE, highest IoU/Acc/F1/r). Models trained from a random
initialisation (``pretrained: false`` in the sweep) are marked with a dagger.
"""

from __future__ import annotations

import math
import re
import statistics
from collections import defaultdict
from pathlib import Path

from terratorch_eoplugins.benchmark.runner import METRICS, latest_rows

DAGGER = "†"
#: first line of every Markdown leaderboard written by ``eoplugins sweep`` (how it recognises its own files)
MARKDOWN_MARKER = "<!-- leaderboard written by `eoplugins sweep` from {csv}: rewritten by every sweep or --render -->"
#: PNG text chunk (``Source``) of every plot written by ``eoplugins sweep``
PLOT_SOURCE = "eoplugins sweep leaderboard"
_PRODUCED = re.compile(r"^Produced by `")


def is_sweep_markdown(path: str | Path) -> bool:
    """Whether ``path`` is a leaderboard that ``eoplugins sweep`` wrote (its marker line, or the layout of the
    leaderboards written before the marker existed: a ``## Leaderboard: `` title and a ``Produced by`` line)."""
    try:
        head = Path(path).read_text(errors="replace")[:20000].splitlines()
    except OSError:
        return False
    if head and head[0].startswith("<!-- leaderboard written by `eoplugins sweep`"):
        return True
    return len(head) > 2 and head[0].startswith("## Leaderboard: ") and bool(_PRODUCED.match(head[2]))


def is_sweep_plot(path: str | Path, markdown: str | Path | None = None) -> bool:
    """Whether ``path`` is a plot that ``eoplugins sweep`` wrote (its ``Source`` text chunk; plots written before
    the chunk existed: a Matplotlib PNG beside a leaderboard ``markdown`` that the sweep wrote)."""
    try:
        with open(path, "rb") as f:
            head = f.read(1 << 16)
    except OSError:
        return False
    if not head.startswith(b"\x89PNG"):
        return False
    if PLOT_SOURCE.encode() in head:
        return True
    return b"Matplotlib" in head and markdown is not None and is_sweep_markdown(markdown)


def produced_by_line(path: str | Path) -> str | None:
    """The ``Produced by ...`` line of a leaderboard (verbatim, hand edits included), or None."""
    try:
        lines = Path(path).read_text(errors="replace").splitlines()
    except OSError:
        return None
    return next((ln for ln in lines if _PRODUCED.match(ln)), None)


def _f(v: str | float) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def _params_m(v: float) -> str:
    if math.isnan(v):
        return "?"
    m = v / 1e6
    return f"{m:.3g}" if m < 100 else f"{m:.0f}"


def aggregate(rows: list[dict]) -> dict[tuple, dict]:
    """Group ok rows by (label_fraction, task, model, setting): mean/std of the three metrics over seeds."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        if r.get("status") == "ok":
            groups[(_f(r["label_fraction"]), r["task"], r["model"], r["setting"])].append(r)
    out = {}
    for key, rs in groups.items():
        vals = [[_f(r[m]) for r in rs] for m in ("m1", "m2", "m3")]
        out[key] = {
            "rows": rs,
            "mean": [statistics.fmean(v) if v else math.nan for v in vals],
            "std": [statistics.stdev(v) if len(v) > 1 else math.nan for v in vals],
            "n": len(rs),
            "tunable": statistics.fmean(_f(r["tunable_params"]) for r in rs),
            "total": statistics.fmean(_f(r["total_params"]) for r in rs),
            "train_s": statistics.fmean(_f(r["train_s"]) for r in rs),
            "peak_rss_mb": max(_f(r["peak_rss_mb"]) for r in rs),
        }
    return out


def top3(values: list[float], higher_is_better: bool) -> set[float]:
    """The (up to) three best distinct values."""
    clean = sorted({v for v in values if not math.isnan(v)}, reverse=higher_is_better)
    return set(clean[:3])


def _cell(mean: float, std: float, bold: bool) -> str:
    if math.isnan(mean):
        return "–"
    s = f"{mean:.3f}" + (f"±{std:.3f}" if not math.isnan(std) else "")
    return f"**{s}**" if bold else s


def _rows(csv_path: Path, run_ids: set[str] | None) -> list[dict]:
    return [r for r in latest_rows(csv_path).values() if run_ids is None or r["run_id"] in run_ids]


def render_markdown(csv_path: str | Path, title: str | None = None, command: str | None = None,
                    order: list[str] | None = None, run_ids: set[str] | None = None,
                    produced_by: str | None = None) -> str:
    """The leaderboard of a results CSV (latest row per run; only ``run_ids`` if given, e.g. the sweep's runs).

    ``command`` writes the line ``Produced by `<command>`; raw rows: ...``; ``produced_by`` gives that line verbatim
    instead (the previous leaderboard's, when a re-render produced no new row). The first line is
    :data:`MARKDOWN_MARKER`, by which ``eoplugins sweep`` recognises the files it may rewrite.
    """
    csv_path = Path(csv_path)
    rows = _rows(csv_path, run_ids)
    agg = aggregate(rows)
    first = {r["model"]: r for r in rows}
    tasks = {r["task"]: r for r in rows}
    lines = [f"## {title or 'Leaderboard: ' + csv_path.stem}", ""]
    if produced_by:
        lines += [produced_by, ""]
    elif command:
        lines += [f"Produced by `{command}`; raw rows: `{csv_path.name}` (one per run, command included).", ""]
    lines += ["Metrics on the test split, macro-averaged (IoU, Acc = macro accuracy, F1) for segmentation; RMSE, MAE "
              "and Pearson r for regression. Mean over seeds (±std with several). **Top three** per task and column in "
              f"bold. {DAGGER} random initialisation (`pretrained: false`): no pretrained weights are loaded, so "
              "foundation models are compared as architectures, not as pretrained encoders.", ""]
    model_order = order or list(dict.fromkeys(r["model"] for r in rows))
    for lf in sorted({k[0] for k in agg}, reverse=True):
        for kind in METRICS:
            task_names = [t for t in dict.fromkeys(r["task"] for r in rows)
                          if tasks[t]["kind"] == kind and any(k[0] == lf and k[1] == t for k in agg)]
            if not task_names:
                continue
            cols = [c for c, _, _ in METRICS[kind]]
            lines += [f"### {round(lf * 100)}% labels, {kind}", "",
                      "| Task | Model / Setting | # Tunable Params (M) | " + " | ".join(cols)
                      + " | train s | peak RSS GB |",
                      "|---|---|---|" + "---|" * len(cols) + "---|---|"]
            for t in task_names:
                cells = {k: v for k, v in agg.items() if k[0] == lf and k[1] == t}
                best = [top3([v["mean"][i] for v in cells.values()], METRICS[kind][i][2]) for i in range(3)]
                label = tasks[t]["task_label"]
                for m in [m for m in model_order if any(k[2] == m for k in cells)]:
                    ms = [(k, v) for k, v in cells.items() if k[2] == m]
                    ms.sort(key=lambda kv: list(dict.fromkeys(r["setting"] for r in rows)).index(kv[0][3]))
                    mrow = first[m]
                    name = mrow["model_label"] + ("" if mrow["pretrained"] in ("True", "true", True) else DAGGER)
                    if len(ms) > 1 or ms[0][0][3] != "full":
                        name += " (" + "/".join(v["rows"][0]["setting_label"] for _, v in ms) + ")"
                    params = "/".join(_params_m(v["tunable"]) for _, v in ms)
                    vals = [" / ".join(_cell(v["mean"][i], v["std"][i], v["mean"][i] in best[i]) for _, v in ms)
                            for i in range(3)]
                    train = "/".join(f"{v['train_s']:.0f}" for _, v in ms)
                    rss = "/".join(f"{v['peak_rss_mb'] / 1024:.1f}" for _, v in ms)
                    lines.append(f"| {label} | {name} | {params} | " + " | ".join(vals) + f" | {train} | {rss} |")
                    label = ""
            lines.append("")
    failed = [r for r in rows if r.get("status") != "ok"]
    if failed:
        lines += [f"### Failed runs ({len(failed)})", ""]
        lines += [f"- `{r['run_id']}`: {r.get('error', '')[:200]}" for r in failed]
        lines.append("")
    return MARKDOWN_MARKER.format(csv=csv_path.name) + "\n" + "\n".join(lines)


def render_plot(csv_path: str | Path, out: str | Path, run_ids: set[str] | None = None) -> Path | None:
    """Metric (first column: IoU or RMSE) against tunable parameters, one panel per task; None if nothing ok."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = _rows(Path(csv_path), run_ids)
    agg = aggregate(rows)
    tasks = list(dict.fromkeys(k[1] for k in agg))
    if not tasks:
        return None
    kinds = {r["task"]: r["kind"] for r in rows}
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.5 * len(tasks), 3.8), squeeze=False)
    markers = {1.0: "o"}
    for ax, t in zip(axes[0], tasks, strict=True):
        for (lf, task, m, s), v in agg.items():
            if task != t or math.isnan(v["mean"][0]):
                continue
            ax.scatter(max(v["tunable"], 1.0), v["mean"][0], marker=markers.get(lf, "^"),
                       label=None)
            ax.annotate(f"{m}/{s}" + ("" if lf == 1.0 else f" {round(lf * 100)}%"),
                        (max(v["tunable"], 1.0), v["mean"][0]), fontsize=7)
        ax.set_xscale("log")
        ax.set_xlabel("tunable parameters")
        ax.set_ylabel(METRICS[kinds[t]][0][0])
        ax.set_title(t + " (o 100% labels, ^ fewer)")
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=110, metadata={"Source": PLOT_SOURCE})
    plt.close(fig)
    return out
