"""The sweep's HTML report: one self-contained file that opens offline.

`report_data` is the pure data step (which points, frontier membership, caption numbers), as plain
values that tests assert on; `render_report` only turns them into HTML. The data step produces plain
text, never HTML: every string is escaped once, when rendered.
"""

from __future__ import annotations

import math
import os
import tempfile
from datetime import datetime, timezone
from html import escape
from pathlib import Path
from typing import Any, NamedTuple

import pandas as pd
import plotly.colors
import plotly.graph_objects as go
import plotly.io as pio

from analysis.frontier import pareto_front
from analysis.load import load_answers, load_epochs, load_trials, param_columns, selection_objective, training_id
from hpo.store import COMPLETED, DIVERGED, EARLY_STOPPED, ERROR, OOM, PENDING, RUNNING, Store

# Trials that ran to their end: only these can be on a frontier or be the best trial.
FINISHED = (COMPLETED, EARLY_STOPPED)

# status: (label, plotly marker symbol, colour, line dash in the epoch curves)
STATUS_STYLE = {
    COMPLETED: ("completed", "circle", "#1f77b4", "solid"),
    EARLY_STOPPED: ("early stopped", "triangle-down", "#ff7f0e", "dash"),
    ERROR: ("error", "x", "#d62728", "dot"),
    DIVERGED: ("diverged", "star-triangle-up", "#8c564b", "dot"),
    OOM: ("out of memory", "square-x", "#e377c2", "dot"),
    RUNNING: ("running", "circle-open", "#7f7f7f", "dashdot"),
    PENDING: ("pending", "circle-open", "#bbbbbb", "dashdot"),
}
_OTHER_STYLE = ("other", "diamond", "#9467bd", "dashdot")

METRIC_LABELS = {"win_rate": "win rate", "eval_ppl": "eval perplexity", "train_seconds": "training time"}
SAMPLES_PER_VERDICT = 4
# Past this many trials the per-epoch curves are coloured and listed by status, not one entry per trial.
MAX_LEGEND_TRIALS = 10
X_METRIC = "train_seconds"


# --- data step --------------------------------------------------------------------------------


class FrontierPlot(NamedTuple):
    title: str
    y: str  # the x axis is always X_METRIC, minimised
    y_mode: str
    points: pd.DataFrame  # trials with both x and y known, plus `eligible` and `on_front`
    caption: str

    @property
    def front(self) -> pd.DataFrame:
        """The frontier points, cheapest first: the step line."""
        return self.points[self.points["on_front"]].sort_values([X_METRIC, self.y])


class CurvesPlot(NamedTuple):
    title: str
    metric: str
    curves: pd.DataFrame  # trial_id, status, epoch, <metric>: one row per point, trials best first
    caption: str


class Samples(NamedTuple):
    trial_id: str
    epoch: int
    rows: pd.DataFrame  # prompt_id, prompt, reference, base_answer, answer, verdict
    caption: str


class ReportData(NamedTuple):
    sweep: dict[str, Any]
    params: list[str]
    summary: str
    trials: pd.DataFrame  # load_trials, finished trials best first
    best_trial: str | None
    frontiers: list[FrontierPlot]
    curves: list[CurvesPlot]
    notes: list[str]  # why a figure is missing
    samples: Samples | None

    @property
    def figure_count(self) -> int:
        return len(self.frontiers) + len(self.curves)


def report_data(store: Store) -> ReportData:
    """Everything the report shows, as plain values."""
    sweep = store.sweep()
    epochs = load_epochs(store)
    metric, mode = selection_objective(sweep["objectives"], epochs)
    trials = _rank(load_trials(store), metric, mode)
    finished = trials[trials["status"].isin(FINISHED) & trials[metric].notna()]
    best = finished.iloc[0] if len(finished) else None

    frontiers, curves, notes = [], [], []
    for y, y_mode, title in (("win_rate", "max", "cost vs win rate"), ("eval_ppl", "min", "cost vs perplexity")):
        plot = _frontier_plot(trials, y, y_mode, title)
        if plot:
            frontiers.append(plot)
        else:
            notes.append(f"No trial has reported {y} yet, so there is no {title} figure.")
    order: dict[str, int] = {}
    for i, trial_id in enumerate(trials["trial_id"]):
        order.setdefault(training_id(trial_id), i)  # folded rows (id@epochs) share one training's curve
    for y, y_mode in (("eval_ppl", "min"), ("win_rate", "max")):
        plot = _curves_plot(epochs, order, y, y_mode)
        if plot:
            curves.append(plot)
        else:
            notes.append(f"No trial has reported {y} yet, so there are no per-epoch curves of it.")

    return ReportData(
        sweep=sweep,
        params=param_columns(store),
        summary=_summary(trials, best, metric),
        trials=trials,
        best_trial=None if best is None else best["trial_id"],
        frontiers=frontiers,
        curves=curves,
        notes=notes,
        samples=None if best is None else _samples(store, best),
    )


def _rank(trials: pd.DataFrame, metric: str, mode: str) -> pd.DataFrame:
    """Finished trials first, each group by `metric` best first (cheaper first among ties), NaNs last."""
    keys = trials.assign(
        _unfinished=~trials["status"].isin(FINISHED),
        _key=trials[metric] if mode == "min" else -trials[metric],
    )
    ranked = keys.sort_values(["_unfinished", "_key", X_METRIC], na_position="last", kind="stable")
    return ranked.drop(columns=["_unfinished", "_key"]).reset_index(drop=True)


def _frontier_plot(trials: pd.DataFrame, y: str, y_mode: str, title: str) -> FrontierPlot | None:
    plotted = trials[trials[X_METRIC].notna() & trials[y].notna()]
    if plotted.empty:
        return None
    eligible = plotted["status"].isin(FINISHED)
    on_front = pareto_front(plotted[eligible], {X_METRIC: "min", y: y_mode})
    points = plotted.assign(eligible=eligible, on_front=on_front.reindex(plotted.index, fill_value=False))

    front = points[points["on_front"]].sort_values(X_METRIC)
    label = METRIC_LABELS.get(y, y)
    if front.empty:
        caption = f"No finished trial has reported {label} yet; the {len(points)} shown are running or failed"
    elif len(front) == 1:
        only = front.iloc[0]
        caption = (
            f"Trial {only['trial_id']} alone is on the frontier, both cheapest and best: "
            f"{label} {_num(only[y])} after {_duration(only[X_METRIC])}"
        )
    else:
        cheap, top = front.iloc[0], front.iloc[-1]
        caption = (
            f"{len(front)} of {int(eligible.sum())} finished trials are on the frontier, from {cheap['trial_id']} "
            f"({label} {_num(cheap[y])} after {_duration(cheap[X_METRIC])}) to {top['trial_id']} "
            f"({label} {_num(top[y])} after {_duration(top[X_METRIC])})"
        )
    left_out = len(trials) - len(points)
    if left_out:
        verb = "is" if left_out == 1 else "are"
        caption += f"; {_plural(left_out, 'trial')} without these metrics {verb} only in the table"
    return FrontierPlot(title=title, y=y, y_mode=y_mode, points=points, caption=caption + ".")


def _curves_plot(epochs: pd.DataFrame, order: dict[str, int], metric: str, mode: str) -> CurvesPlot | None:
    curves = epochs.loc[epochs[metric].notna(), ["trial_id", "status", "epoch", metric]]
    if curves.empty:
        return None
    curves = curves.assign(_rank=curves["trial_id"].map(order)).sort_values(["_rank", "epoch"]).drop(columns="_rank")
    extreme = curves.loc[curves[metric].idxmin() if mode == "min" else curves[metric].idxmax()]
    label = METRIC_LABELS.get(metric, metric)
    caption = (
        f"{label.capitalize()} per epoch for {_plural(curves['trial_id'].nunique(), 'trial')}; "
        f"the {'lowest' if mode == 'min' else 'highest'}, {_num(extreme[metric])}, "
        f"is trial {extreme['trial_id']} at epoch {int(extreme['epoch'])}."
    )
    return CurvesPlot(title=f"{label} per epoch", metric=metric, curves=curves.reset_index(drop=True), caption=caption)


def _samples(store: Store, best: pd.Series) -> Samples | None:
    """Up to SAMPLES_PER_VERDICT judged prompts of each verdict, for the best trial at its best epoch."""
    epoch = int(best["best_epoch"])
    answers = load_answers(store, best["trial_id"])
    answers = answers[answers["epoch"] == epoch]
    if answers.empty:
        return None
    rows = (
        answers.sort_values("prompt_id")
        .groupby("verdict", sort=False)
        .head(SAMPLES_PER_VERDICT)
        .sort_values(["verdict", "prompt_id"], ascending=[False, True])
    )
    counts = answers["verdict"].map(_verdict).value_counts()
    tally = ", ".join(_plural(int(counts[v]), v) for v in ("win", "tie", "loss") if v in counts)
    caption = (
        f"{len(rows)} of {len(answers)} judged prompts for trial {best['trial_id']} at epoch {epoch}, "
        f"up to {SAMPLES_PER_VERDICT} per verdict; over all {len(answers)}: {tally}."
    )
    columns = ["prompt_id", "prompt", "reference", "base_answer", "answer", "verdict"]
    return Samples(trial_id=best["trial_id"], epoch=epoch, rows=rows[columns].reset_index(drop=True), caption=caption)


def _summary(trials: pd.DataFrame, best: pd.Series | None, metric: str) -> str:
    counts = trials["status"].value_counts()
    order = [s for s in STATUS_STYLE if s in counts] + [s for s in counts.index if s not in STATUS_STYLE]
    statuses = ", ".join(_plural(counts[s], "error") if s == ERROR else f"{counts[s]} {_style(s)[0]}" for s in order)
    census = f"{_plural(len(trials), 'trial')}: {statuses}" if len(trials) else "no trials yet"
    if best is None:
        return f"No trial has finished with metrics yet; {census}."
    metrics = [metric] + [m for m in ("win_rate", "eval_ppl") if m != metric]
    parts = [f"{METRIC_LABELS.get(m, m)} {_num(best[m])}" for m in metrics if pd.notna(best[m])]
    parts[0] += f" at epoch {int(best['best_epoch'])}"
    return f"Best trial {best['trial_id']}: {', '.join(parts)}, {_duration(best[X_METRIC])} of training; {census}."


def _verdict(value: float) -> str:
    return {1.0: "win", 0.5: "tie", 0.0: "loss"}.get(float(value), _num(value))


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}es" if word.endswith("s") else f"{n} {word}s"


def _num(value: float) -> str:
    """Three significant digits like "{:.3g}", but 1234.5 reads "1,234" rather than "1.23e+03"."""
    if pd.isna(value):
        return "–"
    if value == 0 or abs(value) < 1:
        return f"{value:.3g}"
    text = f"{value:,.{max(0, 2 - int(math.floor(math.log10(abs(value)))))}f}"
    return text.rstrip("0").rstrip(".") if "." in text else text


def _duration(seconds: float) -> str:
    if pd.isna(seconds):
        return "unknown time"
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _style(status: str) -> tuple[str, str, str, str]:
    return STATUS_STYLE.get(status, (status, *_OTHER_STYLE[1:]))


# --- rendering --------------------------------------------------------------------------------


def build_report(store: Store) -> str:
    """The report as one self-contained HTML page."""
    return render_report(report_data(store))


def write_report(store: Store, path: Path) -> Path:
    """Write the report to `path` atomically (a temporary file renamed over it)."""
    page = build_report(store)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide the report from whoever serves it
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(page)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def render_report(data: ReportData) -> str:
    """The HTML page for `data`; plotly.js is inlined once, in the first figure."""
    colours = _trial_colours(data.trials["trial_id"].map(training_id).drop_duplicates())
    figures = [_frontier_figure(p, data.params) for p in data.frontiers]
    figures += [_curves_figure(p, colours, data.best_trial) for p in data.curves]
    divs = [
        pio.to_html(
            fig,
            include_plotlyjs=i == 0,
            full_html=False,
            div_id=f"figure-{i}",
            config={"displaylogo": False, "responsive": True},
        )
        for i, fig in enumerate(figures)
    ]
    blocks = [
        _figure_block(plot.title, div, plot.caption)
        for plot, div in zip([*data.frontiers, *data.curves], divs, strict=True)
    ]
    n_frontiers = len(data.frontiers)
    sweep = data.sweep
    meta = [f"status {sweep['status']}", f"started {_date(sweep['started_at'])}"]
    if sweep.get("finished_at"):
        meta.append(f"finished {_date(sweep['finished_at'])}")
    if sweep.get("git_commit"):
        meta.append(f"git {sweep['git_commit'][:12]}")
    meta.append(f"sweep file {sweep['sweep_file']}")
    sweep_note = [f"Sweep: {sweep['note']}."] if sweep.get("note") else []
    notes = "".join(f'<p class="note">{escape(n)}</p>' for n in [*sweep_note, *data.notes])

    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Sweep {escape(sweep["name"])}</title>
<style>{_CSS}</style>
</head>
<body>
<main>
<header>
<h1>Sweep {escape(sweep["name"])}</h1>
<p class="meta">{" · ".join(escape(m) for m in meta)}</p>
</header>
<p class="summary">{escape(data.summary)}</p>
{notes}
<section>
<h2>Cost vs performance</h2>
<div class="grid">{"".join(blocks[:n_frontiers])}</div>
</section>
<section>
<h2>Per-epoch curves</h2>
<div class="grid">{"".join(blocks[n_frontiers:])}</div>
</section>
<section>
<h2>Trials</h2>
{_trials_table(data)}
</section>
{_samples_section(data.samples)}
</main>
</body>
</html>
"""


def _figure_block(title: str, div: str, caption: str) -> str:
    heading = title[:1].upper() + title[1:]
    return f"<figure><h3>{escape(heading)}</h3>{div}<figcaption>{escape(caption)}</figcaption></figure>"


def _frontier_figure(plot: FrontierPlot, params: list[str]) -> go.Figure:
    fig = go.Figure()
    for status, group in plot.points.groupby("status", sort=False):
        label, symbol, colour, _ = _style(status)
        fig.add_trace(
            go.Scatter(
                x=group[X_METRIC],
                y=group[plot.y],
                mode="markers",
                name=escape(f"{label} ({len(group)})"),
                marker={"symbol": symbol, "color": colour, "size": 10, "opacity": 0.85},
                hovertext=[_hover(row, plot.y, params) for _, row in group.iterrows()],
                hoverinfo="text",
            )
        )
    front = plot.front
    fig.add_trace(
        go.Scatter(
            x=front[X_METRIC],
            y=front[plot.y],
            mode="lines+markers",
            name="Pareto frontier",
            line={"shape": "hv", "color": "#333", "width": 1.5},
            marker={"symbol": "circle-open", "size": 17, "color": "#333", "line": {"width": 2}},
            hoverinfo="skip",
        )
    )
    better = "higher is better" if plot.y_mode == "max" else "lower is better"
    y_label = f"{METRIC_LABELS.get(plot.y, plot.y)} at best epoch ({better})"
    return _layout(fig, "training seconds (trial total)", y_label)


def _curves_figure(plot: CurvesPlot, colours: dict[str, str], best_trial: str | None) -> go.Figure:
    """One line per trial, the best one black and thick; past MAX_LEGEND_TRIALS, coloured and listed by status."""
    by_status = plot.curves["trial_id"].nunique() > MAX_LEGEND_TRIALS
    listed: set[str] = set()
    fig = go.Figure()
    for trial_id, group in plot.curves.groupby("trial_id", sort=False):
        status = group["status"].iloc[0]
        label, symbol, status_colour, dash = _style(status)
        legend: dict[str, Any] = {}
        if best_trial is not None and trial_id == training_id(best_trial):
            name, colour = f"{trial_id} ★ best", "#111"
        elif by_status:
            name, colour = label, status_colour
            legend = {"legendgroup": status, "showlegend": status not in listed, "opacity": 0.6}
            listed.add(status)
        else:
            name, colour = (trial_id if status == COMPLETED else f"{trial_id} ({label})"), colours[trial_id]
        fig.add_trace(
            go.Scatter(
                x=group["epoch"],
                y=group[plot.metric],
                mode="lines+markers",
                name=escape(name),
                line={"color": colour, "dash": dash, "width": 3 if best_trial is not None and trial_id == training_id(best_trial) else 1.5},
                marker={"symbol": symbol, "size": 7},
                hovertemplate=f"{escape(trial_id)}<br>epoch %{{x}}: %{{y:.4g}}<extra></extra>",
                **legend,
            )
        )
    fig.update_xaxes(dtick=1)
    return _layout(fig, "epoch", METRIC_LABELS.get(plot.metric, plot.metric))


def _layout(fig: go.Figure, x_title: str, y_title: str) -> go.Figure:
    fig.update_layout(
        template="plotly_white",
        height=440,
        margin={"l": 60, "r": 10, "t": 30, "b": 10},
        xaxis_title=x_title,
        yaxis_title=y_title,
        legend={"orientation": "h", "x": 0, "y": -0.18, "yanchor": "top", "font": {"size": 11}},
        hoverlabel={"align": "left"},
    )
    return fig


def _hover(row: pd.Series, y: str, params: list[str]) -> str:
    label = _style(row["status"])[0]
    lines = [f"<b>{escape(str(row['trial_id']))}</b> ({escape(label)})"]
    lines += [f"{escape(p)} = {escape(_cell(row[p]))}" for p in params]
    lines.append(f"{escape(METRIC_LABELS.get(y, y))} {_num(row[y])} at epoch {int(row['best_epoch'])}")
    lines.append(f"{_duration(row[X_METRIC])} of training")
    return "<br>".join(lines)


def _trial_colours(trial_ids: pd.Series) -> dict[str, str]:
    palette = plotly.colors.qualitative.D3
    return {trial_id: palette[i % len(palette)] for i, trial_id in enumerate(trial_ids)}


# How the table shows each numeric column; params and other values go through _cell.
_FORMATS = {
    "epochs_completed": "{:.0f}".format,
    "best_epoch": "{:.0f}".format,
    "wins": "{:.0f}".format,
    "losses": "{:.0f}".format,
    "ties": "{:.0f}".format,
    "eval_ppl": "{:.3f}".format,
    "win_rate": "{:.3f}".format,
    "train_seconds": "{:,.1f}".format,
    "gpu_hours": _num,
    "cost_usd": _num,
    "peak_memory_gb": "{:.1f}".format,
}


def _trials_table(data: ReportData) -> str:
    columns = [c for c in data.trials.columns if c != "error"]
    # <wbr> lets long names like epochs_completed break after an underscore.
    head = "".join(f"<th>{escape(c).replace('_', '_<wbr>')}</th>" for c in [*columns, "error"])
    rows = []
    for _, trial in data.trials.iterrows():
        cells = []
        for c in columns:
            value = trial[c]
            if c == "status":
                label, _, colour, _ = _style(value)
                cells.append(f'<td class="status"><span style="color:{colour}">●</span> {escape(label)}</td>')
            elif c in _FORMATS:
                cells.append(f'<td class="num">{"–" if pd.isna(value) else _FORMATS[c](value)}</td>')
            elif c == "trial_id":
                cells.append(f'<td class="id">{escape(value)}</td>')
            else:
                cells.append(f"<td>{escape(_cell(value))}</td>")
        cells.append(f"<td>{_error_cell(trial['error'])}</td>")
        classes = f"status-{escape(str(trial['status']))}" + (" best" if trial["trial_id"] == data.best_trial else "")
        rows.append(f'<tr class="{classes}">{"".join(cells)}</tr>')
    caption = "Finished trials first, best first; metrics are those of each trial's best epoch, costs its totals."
    return (
        f'<p class="caption">{escape(caption)}</p>'
        f'<div class="scroll"><table class="trials"><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table></div>"
    )


def _error_cell(error: Any) -> str:
    if pd.isna(error) or not str(error).strip():
        return ""
    text = str(error).strip()
    first = text.splitlines()[0]
    if len(first) <= 100 and first == text:
        return f'<span class="error">{escape(text)}</span>'
    short = first if len(first) <= 100 else first[:99] + "…"
    return f'<details class="error"><summary>{escape(short)}</summary><pre>{escape(text)}</pre></details>'


def _samples_section(samples: Samples | None) -> str:
    if samples is None:
        return ""
    head = "".join(f"<th>{h}</th>" for h in ("#", "prompt", "reference", "base answer", "trial answer", "verdict"))
    rows = []
    for _, r in samples.rows.iterrows():
        texts = "".join(
            f'<td><div class="text">{escape(str(r[c]))}</div></td>'
            for c in ("prompt", "reference", "base_answer", "answer")
        )
        verdict = _verdict(r["verdict"])
        rows.append(
            f'<tr><td class="num">{int(r["prompt_id"])}</td>{texts}'
            f'<td class="verdict {escape(verdict)}">{escape(verdict)}</td></tr>'
        )
    return (
        f"<section><h2>Judged prompts: trial {escape(samples.trial_id)}, epoch {samples.epoch}</h2>"
        f'<p class="caption">{escape(samples.caption)}</p>'
        f'<div class="scroll"><table class="samples"><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table></div></section>"
    )


def _cell(value: Any) -> str:
    """A parameter or other value as short text."""
    if isinstance(value, (list, tuple)):
        return ", ".join(map(_cell, value))
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def _date(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, tz=timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #222; margin: 0;
       background: #fafafa; line-height: 1.45; }
main { max-width: 1280px; margin: 0 auto; padding: 1.5rem 2rem 3rem; background: #fff; }
h1 { margin: 0 0 .2rem; font-size: 1.6rem; overflow-wrap: anywhere; }
h2 { font-size: 1.2rem; margin: 2rem 0 .6rem; border-bottom: 1px solid #ddd; padding-bottom: .2rem; }
h3 { font-size: 1rem; margin: 0 0 .3rem; }
.meta { color: #666; margin: 0; font-size: .9rem; overflow-wrap: anywhere; }
.summary { font-size: 1.05rem; background: #f1f6fb; border-left: 4px solid #1f77b4; padding: .6rem .9rem; }
/* Two fixed columns: plotly sizes each figure when its script runs, before later figures exist. */
.grid { display: grid; grid-template-columns: repeat(2, minmax(0, 1fr)); gap: 1.2rem; }
@media (max-width: 1000px) { .grid { grid-template-columns: minmax(0, 1fr); } }
figure { margin: 0; border: 1px solid #e6e6e6; border-radius: 4px; padding: .6rem; min-width: 0; }
figcaption, .caption, .note { color: #555; font-size: .9rem; }
.note { font-style: italic; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; font-size: .85rem; width: 100%; }
th, td { border-bottom: 1px solid #e6e6e6; padding: .3rem .4rem; text-align: left; vertical-align: top; }
th { background: #f4f4f4; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tr.status-early_stopped { background: #fff7ec; }
tr.status-error { background: #fdeeee; }
tr.best { font-weight: 600; box-shadow: inset 4px 0 0 #1f77b4; }
td.status, td.id { white-space: nowrap; }
.error { color: #a11; font-family: ui-monospace, monospace; font-size: .8rem; }
table.trials td:last-child { min-width: 18ch; overflow-wrap: anywhere; }
details.error pre { white-space: pre-wrap; max-width: 60ch; }
table.samples td { max-width: 28ch; }
.text { white-space: pre-wrap; max-height: 11em; overflow: auto; overflow-wrap: anywhere; }
td.verdict { font-weight: 600; }
td.win { color: #2a7d2a; } td.tie { color: #8a6d00; } td.loss { color: #b22; }
"""
