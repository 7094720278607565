"""Render a sweep's results CSV as a Markdown leaderboard (LIANet supplement, table 3 layout) and a PNG plot.

Layout of table 3 ("Task | Model / Setting | # Tunable Params (M) | IoU | ACC | F1", all macro): one table per
label fraction for segmentation, rows grouped by task; one row per model whose settings are joined with ``/`` as in
"TerraMind-base (Full/Frozen/Embedding) | 102/15.5/0.39 | 26.1/23.0/24.2 | ...". IoU, Acc and F1 are shown in
percent with one decimal, as PANGAEA reports them (the CSV keeps fractions). Regression tasks use RMSE/MAE (in the
task's own target units) and Pearson r, **one table per regression task**: two tasks on the same dataset in other
units (CropNet's standardised log yield of terratorch's scalar regression vs the TS-fusion task's yields) are
never put in one column. Values are means over seeds (``mean±std`` when there are several).

Bolding (:func:`best_values`): in each task and metric column the best values in the metric's own direction
(lowest RMSE/MAE, highest IoU/Acc/F1/r) are bold, **at most min(3, n - 1)** of the ``n`` values, so a column is
never bold throughout (a task with one entry has none, two entries one, three entries two); tied values are bold
together only when all of them fit within that limit. Models trained from a random initialisation
(``pretrained: false`` in the sweep) are marked with a dagger.
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
    """Group ok rows by (label_fraction, task, model, setting): mean/std of the three metrics over seeds (and
    folds: a sweep with ``folds`` has one row per seed x fold)."""
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


#: leaderboard columns shown in percent (fractions in the CSV), as PANGAEA reports them
PERCENT_COLUMNS = frozenset({"IoU", "Acc", "F1"})
#: most values bold per task and column
MAX_BOLD = 3


def best_values(values: list[float], higher_is_better: bool, limit: int = MAX_BOLD) -> set[float]:
    """The values to bold in one column: a value is bold when at most ``min(limit, n - 1)`` of the ``n`` (non-NaN)
    values are at least as good as it (ties are bold together or not at all), so never more than ``limit`` and
    never the whole column."""
    clean = [v for v in values if not math.isnan(v)]
    k = min(limit, len(clean) - 1)
    out = set()
    for v in clean:
        as_good = sum(1 for w in clean if (w >= v if higher_is_better else w <= v))
        if as_good <= k:
            out.add(v)
    return out


def format_value(value: float, column: str) -> str:
    """A leaderboard number: percent with one decimal for IoU/Acc/F1, else three decimals (target units, r)."""
    if math.isnan(value):
        return "nan"
    return f"{100 * value:.1f}" if column in PERCENT_COLUMNS else f"{value:.3f}"


def _cell(mean: float, std: float, bold: bool, column: str = "") -> str:
    if math.isnan(mean):
        return "–"
    s = format_value(mean, column) + (f"±{format_value(std, column)}" if not math.isnan(std) else "")
    return f"**{s}**" if bold else s


def _header(column: str) -> str:
    return f"{column} (%)" if column in PERCENT_COLUMNS else column


def _rows(csv_path: Path, run_ids: set[str] | None) -> list[dict]:
    return [r for r in latest_rows(csv_path).values() if run_ids is None or r["run_id"] in run_ids]


def _table(task_names: list[str], kind: str, lf: float, agg: dict[tuple, dict], rows: list[dict],
           model_order: list[str]) -> list[str]:
    """Markdown lines of one table: the header and one row per model of each task in ``task_names``."""
    cols = METRICS[kind]
    first = {r["model"]: r for r in rows}
    tasks = {r["task"]: r for r in rows}
    settings = list(dict.fromkeys(r["setting"] for r in rows))
    lines = ["| Task | Model / Setting | # Tunable Params (M) | " + " | ".join(_header(c) for c, _, _ in cols)
             + " | train s | peak RSS GB |", "|---|---|---|" + "---|" * len(cols) + "---|---|"]
    for t in task_names:
        cells = {k: v for k, v in agg.items() if k[0] == lf and k[1] == t}
        best = [best_values([v["mean"][i] for v in cells.values()], cols[i][2]) for i in range(3)]
        label = tasks[t]["task_label"]
        for m in [m for m in model_order if any(k[2] == m for k in cells)]:
            ms = sorted(((k, v) for k, v in cells.items() if k[2] == m), key=lambda kv: settings.index(kv[0][3]))
            mrow = first[m]
            name = mrow["model_label"] + ("" if mrow["pretrained"] in ("True", "true", True) else DAGGER)
            if len(ms) > 1 or ms[0][0][3] != "full":
                name += " (" + "/".join(v["rows"][0]["setting_label"] for _, v in ms) + ")"
            params = "/".join(_params_m(v["tunable"]) for _, v in ms)
            vals = [" / ".join(_cell(v["mean"][i], v["std"][i], v["mean"][i] in best[i], cols[i][0]) for _, v in ms)
                    for i in range(3)]
            train = "/".join(f"{v['train_s']:.0f}" for _, v in ms)
            rss = "/".join(f"{v['peak_rss_mb'] / 1024:.1f}" for _, v in ms)
            lines.append(f"| {label} | {name} | {params} | " + " | ".join(vals) + f" | {train} | {rss} |")
            label = ""
    return [*lines, ""]


def test_pixel_lines(rows: list[dict]) -> list[str]:
    """Markdown lines saying, per task and fold, whether every ok run was scored on the same number of test pixels
    (the ``test_pixels`` column); runs of another test set (a different count) are named. Empty without counts."""
    groups: dict[tuple[str, str], dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if r.get("status") == "ok" and str(r.get("test_pixels", "")).strip():
            fold = m.group(1) if (m := re.search(r"__f(\d+)$", r["run_id"])) else ""
            groups[(r["task_label"], fold)][str(int(float(r["test_pixels"])))].append(r["run_id"])
    if not groups:
        return []
    lines = ["### Test pixels", ""]
    for (task, fold), counts in groups.items():
        where = f"{task}" + (f", fold {fold}" if fold else "")
        if len(counts) == 1:
            n, ids = next(iter(counts.items()))
            lines.append(f"- {where}: every run ({len(ids)}) scored {int(n):,} test pixels.")
        else:
            parts = "; ".join(f"{int(n):,}: " + ", ".join(f"`{i}`" for i in ids) for n, ids in counts.items())
            lines.append(f"- {where}: **runs scored different numbers of test pixels** ({parts}).")
    return [*lines, ""]


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
    tasks = {r["task"]: r for r in rows}
    lines = [f"## {title or 'Leaderboard: ' + csv_path.stem}", ""]
    if produced_by:
        lines += [produced_by, ""]
    elif command:
        lines += [f"Produced by `{command}`; raw rows: `{csv_path.name}` (one per run, command included).", ""]
    lines += ["Metrics on the test split, macro-averaged (IoU, Acc = macro accuracy, F1; in %) for segmentation; "
              "RMSE and MAE in the task's target units and Pearson r for regression, one table per regression task. "
              "Mean over seeds and folds (±std with several). Per task and column the best values are in bold, at "
              f"most three and never the whole column (at most n - 1 of n). {DAGGER} random initialisation "
              "(`pretrained: false`): no pretrained weights are loaded, so foundation models are compared as "
              "architectures, not as pretrained encoders.", ""]
    model_order = order or list(dict.fromkeys(r["model"] for r in rows))
    for lf in sorted({k[0] for k in agg}, reverse=True):
        for kind in METRICS:
            task_names = [t for t in dict.fromkeys(r["task"] for r in rows)
                          if tasks[t]["kind"] == kind and any(k[0] == lf and k[1] == t for k in agg)]
            if not task_names:
                continue
            # segmentation metrics share one scale (%): one table; regression units differ by task: one table each
            groups = [task_names] if kind == "segmentation" else [[t] for t in task_names]
            for group in groups:
                title = kind if kind == "segmentation" else f"{kind}: {tasks[group[0]]['task_label']}"
                lines += [f"### {round(lf * 100)}% labels, {title}", ""]
                lines += _table(group, kind, lf, agg, rows, model_order)
    lines += test_pixel_lines(rows)
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
