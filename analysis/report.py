"""The sweep's HTML report: one self-contained file that opens offline.

`analysis.report_data.report_data` is the pure data step (plain values that tests assert on);
`render_report` only turns them into HTML, with the figures drawn by `analysis.figures`. Every
string from the data is escaped here, once.
"""

from __future__ import annotations

import os
import tempfile
from datetime import datetime, timezone
from html import escape
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import plotly.io as pio

from analysis import figures
from analysis.load import training_id
from analysis.report_data import (
    ALPHA,
    MIN_PAIRS,
    MIN_SAVING,
    CurvesPlot,
    EffectsPlot,
    FrontierPlot,
    ImportancePlot,
    ParallelPlot,
    ReportData,
    Samples,
    ScatterPlot,
    report_data,
    sweet_spot,
    trial_names,
    with_recommendation,
)
from analysis.style import (
    NOT_JUDGED,
    RECOMMENDATION_STYLE,
    STATUS_STYLE,
    cell,
    flops,
    label,
    missing,
    num,
    plural,
    sentence_case,
    style,
    verdict_word,
)
from hpo.store import Store

__all__ = [
    "build_report", "figure_for", "marks_for", "render_report", "report_data", "sweet_spot", "table_columns",
    "write_report",
]  # fmt: skip


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


def figure_for(plot: Any, data: ReportData, marks: figures.Marks | None = None) -> go.Figure:
    """The plotly figure of one plot of `data` (any of data.sections' plots); `marks`: marks_for(data)."""
    marks = marks_for(data) if marks is None else marks
    if isinstance(plot, FrontierPlot):
        return figures.frontier_figure(plot, data.params, marks)
    if isinstance(plot, CurvesPlot):
        colours = figures.trial_colours(data.trials["trial_id"].map(training_id).drop_duplicates())
        return figures.curves_figure(plot, colours, marks)
    if isinstance(plot, ScatterPlot):
        return figures.scatter_figure(plot, data.params, marks)
    if isinstance(plot, EffectsPlot):
        return figures.effects_figure(plot, marks)
    if isinstance(plot, ParallelPlot):
        return figures.parallel_figure(plot, marks)
    if isinstance(plot, ImportancePlot):
        return figures.importance_figure(plot)
    raise TypeError(f"no figure for {type(plot).__name__}")


def marks_for(data: ReportData) -> figures.Marks:
    """The trials' names and the recommended trials, as every figure marks them."""
    names = data.names.to_dict()
    trainings = data.trials["trial_id"].map(training_id)
    if (trainings != data.trials["trial_id"]).any():  # folded epochs: one curve per training, named without epochs
        first = data.trials.assign(trial_id=trainings).drop_duplicates("trial_id")
        names |= trial_names(first, [p for p in data.params if p != "epochs"]).to_dict()
    picks = {kind: trial_id for trial_id, kind in data.recommendation.items() if kind}
    picks = {kind: picks[kind] for kind in RECOMMENDATION_STYLE if kind in picks}  # the best first
    epochs = data.trials.set_index("trial_id")["best_epoch"]
    return figures.Marks(names, picks, {t: int(epochs[t]) for t in picks.values()})


def render_report(data: ReportData) -> str:
    """The HTML page for `data`; plotly.js is inlined once, in the first figure."""
    marks = marks_for(data)
    sections, index = [], 0
    for heading, plots in data.sections:
        if not plots:
            continue
        blocks = []
        for plot in plots:
            div = pio.to_html(
                figure_for(plot, data, marks),
                include_plotlyjs=index == 0,
                full_html=False,
                div_id=f"figure-{index}",
                config={"displaylogo": False, "responsive": True},
            )
            wide = ' class="wide"' if isinstance(plot, (EffectsPlot, ParallelPlot, ImportancePlot)) else ""
            blocks.append(
                f"<figure{wide}><h3>{escape(sentence_case(plot.title))}</h3>{div}"
                f"<figcaption>{escape(plot.caption)}</figcaption></figure>"
            )
            index += 1
        sections.append(f'<section><h2>{escape(heading)}</h2><div class="grid">{"".join(blocks)}</div></section>')

    sweep = data.sweep
    meta = [f"status {sweep['status']}", f"started {_date(sweep['started_at'])}"]
    if sweep.get("finished_at"):
        meta.append(f"finished {_date(sweep['finished_at'])}")
    if sweep.get("git_commit"):
        meta.append(f"git {sweep['git_commit'][:12]}")
    meta.append(f"sweep file {sweep['sweep_file']}")
    sweep_note = [f"Sweep: {sweep['note']}."] if sweep.get("note") else []
    notes = "".join(f'<p class="note">{escape(n)}</p>' for n in [*sweep_note, *data.notes])
    headline = "".join(f"<p>{escape(s)}</p>" for s in data.headline)

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
<div class="summary">{headline}<p class="census">{escape(data.census)}</p></div>
{notes}
{"".join(sections)}
<section>
<h2>Trials</h2>
{_trials_table(data)}
</section>
{_samples_section(data.samples, data.names)}
{_methods_section(data)}
</main>
<script>{_SORT_JS}</script>
</body>
</html>
"""


# How the table shows each numeric column; params and other values go through _cell.
_FORMATS = {
    "epochs_completed": "{:.0f}".format,
    "best_epoch": "{:.0f}".format,
    "wins": "{:.0f}".format,
    "losses": "{:.0f}".format,
    "ties": "{:.0f}".format,
    "eval_ppl": "{:.3f}".format,
    "retention_ppl": "{:.3f}".format,
    "judge_parse_rate": "{:.2f}".format,
    "order_agreement": "{:.2f}".format,
    "answer_length_diff": "{:+.1f}".format,
    "train_seconds": "{:,.1f}".format,
    "eval_seconds": "{:,.1f}".format,
    "judge_seconds": "{:,.1f}".format,
    "train_flops": flops,
    "eval_flops": flops,
    "gpu_hours": num,
    "cost_usd": num,
    "peak_memory_gb": "{:.1f}".format,
}


def table_columns(data: ReportData) -> list[str]:
    """The trials table's columns before `error`, like the studies' tables; the CSV download has every column.

    The win rate cell holds its interval and counts; a pairwise judge's parse rate and order agreement follow
    it; a column no trial has a value for is left out (so these two are, for the reference judge).
    """
    wanted = [
        "trial_id", "status", *data.params, "epochs_completed", "best_epoch", "eval_ppl", "win_rate",
        "judge_parse_rate", "order_agreement", "retention_ppl", "train_seconds",
        *([data.cost] if data.cost != "train_seconds" else []), "peak_memory_gb",
    ]  # fmt: skip
    trials = data.trials
    return [c for c in wanted if c in ("trial_id", "status") or trials[c].map(missing).eq(False).any()]


def _trials_table(data: ReportData) -> str:
    trials = data.trials
    columns = table_columns(data)
    names, recommendation = data.names, data.recommendation
    # <wbr> lets long names like epochs_completed break after an underscore.
    head = "".join(
        f'<th scope="col"{_header_title(c)}><button type="button">{escape(c).replace("_", "_<wbr>")}</button></th>'
        for c in ["name", *columns, "error"]
    )
    rows = []
    for _, trial in trials.iterrows():
        kind = recommendation[trial["trial_id"]]
        badge = ""
        if kind:
            text, _, colour = RECOMMENDATION_STYLE[kind]
            mark = "★" if kind == "best" else "◆"
            badge = f' <span class="pick" style="color:{colour}">{mark}&nbsp;{escape(text)}</span>'
        cells = [f'<td class="name">{escape(names[trial["trial_id"]])}{badge}</td>']
        for c in columns:
            value = trial[c]
            if c == "status":
                status_label, _, colour, _ = style(value)
                rank = list(STATUS_STYLE).index(value) if value in STATUS_STYLE else len(STATUS_STYLE)
                dot = f'<span style="color:{colour}">●</span>'
                cells.append(f'<td class="status" data-sort="{rank}">{dot} {escape(status_label)}</td>')
            elif c == "win_rate":
                cells.append(_win_rate_cell(trial))
            elif c in _FORMATS:
                text = "–" if pd.isna(value) else _FORMATS[c](value)
                cells.append(f'<td class="num" data-sort="{_sort_key(value)}">{text}</td>')
            elif c == "trial_id":
                cells.append(f'<td class="id">{escape(value)}</td>')
            else:
                cells.append(f'<td data-sort="{escape(_sort_key(value))}">{escape(cell(value))}</td>')
        cells.append(f"<td>{_error_cell(trial['error'], trial['error_log'])}</td>")
        classes = f"status-{escape(str(trial['status']))}" + (f" {kind.replace('_', '-')}" if kind else "")
        rows.append(f'<tr class="{classes}">{"".join(cells)}</tr>')
    caption = (
        "Finished trials first, best first; each named by the parameters that differ between trials; metrics are "
        "those of each trial's best epoch, costs its totals; win rate with its 95% interval. "
        "train_seconds is time measured on the machine that ran the sweep, and moves with its load; "
        "train_flops is the compute itself, the same on any machine. Click a column to sort by it."
    )
    csv = with_recommendation(trials, data.sweet_spot).to_csv(index=False)
    filename = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in str(data.sweep["name"])) + "-trials.csv"
    download = (
        f'<a class="download" download="{escape(filename)}" href="data:text/csv;charset=utf-8,{quote(csv)}">'
        f"Download the table as CSV</a> (every column of <code>peftsweep export</code>)"
    )
    return (
        f'<p class="caption">{escape(caption)} {download}</p>'
        f'<div class="scroll"><table class="trials sortable"><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table></div>"
    )


def _header_title(column: str) -> str:
    """A column's meaning on hover, where its name alone could mislead (measured time, compute)."""
    titles = {
        "train_seconds": "training time measured on the machine that ran the sweep (moves with its load)",
        "train_flops": "training compute in FLOPs, from what was processed: the same on any machine",
    }
    return f' title="{escape(titles[column])}"' if column in titles else ""


def _win_rate_cell(trial: pd.Series) -> str:
    value = trial["win_rate"]
    if pd.isna(value):
        shown = NOT_JUDGED if trial.get("epochs_not_judged", 0) else "–"  # an unavailable judge's missing verdicts are no 0
        return f'<td class="num" data-sort="">{shown}</td>'
    interval = ""
    if pd.notna(trial["win_rate_low"]):
        interval = f' <span class="interval">[{trial["win_rate_low"]:.2f}, {trial["win_rate_high"]:.2f}]</span>'
    tally = (("wins", "win"), ("ties", "tie"), ("losses", "loss"))
    counts = ", ".join(plural(int(trial[c]), word) for c, word in tally if pd.notna(trial[c]))
    return f'<td class="num" data-sort="{_sort_key(value)}" title="{counts}">{value:.3f}{interval}</td>'


def _sort_key(value: Any) -> str:
    """What the table's script sorts a cell by: a number as text, empty for a missing value (sorted last)."""
    if missing(value):
        return ""
    if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
        return repr(float(value))
    return cell(value)


def _error_cell(error: Any, log: Any = None) -> str:
    if pd.isna(error) or not str(error).strip():
        return ""
    text = str(error).strip()
    # The report lies beside the store, so errors/<trial>.txt is a link that survives moving the run folder.
    link = "" if not isinstance(log, str) else f' <a class="error-log" href="errors/{quote(Path(log).name)}">full traceback</a>'
    first = text.splitlines()[0]
    if len(first) <= 100 and first == text:
        return f'<span class="error">{escape(text)}</span>{link}'
    short = first if len(first) <= 100 else first[:99] + "…"
    return f'<details class="error"><summary>{escape(short)}</summary><pre>{escape(text)}</pre></details>{link}'


def _samples_section(samples: Samples | None, names: pd.Series) -> str:
    if samples is None:
        return ""
    head = "".join(f"<th>{h}</th>" for h in ("#", "prompt", "reference", "base answer", "trial answer", "verdict"))
    rows = []
    for _, r in samples.rows.iterrows():
        texts = "".join(
            f'<td><div class="text">{escape(str(r[c]))}</div></td>'
            for c in ("prompt", "reference", "base_answer", "answer")
        )
        verdict = verdict_word(r["verdict"])
        rows.append(
            f'<tr><td class="num">{int(r["prompt_id"])}</td>{texts}'
            f'<td class="verdict {escape(verdict)}">{escape(verdict)}</td></tr>'
        )
    return (
        f"<section><h2>Judged prompts: {escape(names[samples.trial_id])} (trial {escape(samples.trial_id)}), "
        f"epoch {samples.epoch}</h2>"
        f'<p class="caption">{escape(samples.caption)}</p>'
        f'<div class="scroll"><table class="samples"><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table></div></section>"
    )


def _sweet_spot_method(data: ReportData) -> str:
    """How the sweet spot is chosen, with this sweep's report.min_saving and report.margin."""
    min_saving = data.sweet_spot.min_saving if data.sweet_spot else MIN_SAVING
    margin = data.sweet_spot.margin if data.sweet_spot else None
    text = (
        f"Sweet spot: every finished trial that saves at least {min_saving:.0%} of the best's {label(data.cost)} "
        "(report.min_saving) is compared with it, cheapest first, on the prompts both were judged on at their best "
        "epochs. "
    )
    if margin is None:
        return text + (
            "A prompt counts for the trial whose verdict against the base model is higher, equal verdicts are "
            "dropped, and an exact two-sided binomial (sign) test with p = 1/2 gives the p-value. The first trial "
            f"with p ≥ {ALPHA:g} (or judged better more often) is the sweet spot. Not significantly worse is not "
            "proven equal: with few prompts only large differences are detected, and several cheaper trials are "
            "tested without correction. When none qualifies, no configuration is meaningfully cheaper."
        )
    return text + (
        f"The first whose paired difference in win rate has a 95% t interval above -{margin:g} (report.margin), over "
        f"at least {MIN_PAIRS} shared prompts, is the sweet spot: proven at most {margin:g} worse. When none "
        "qualifies, no configuration is meaningfully cheaper."
    )


def _methods_section(data: ReportData) -> str:
    items = [
        f"Best trial: the finished (completed or early-stopped) trial with the best {label(data.metric)} at its "
        f"best epoch, the sweep's first per-epoch objective; the cost axis is {label(data.cost)} ({data.cost}), "
        "the trial's total.",
        "Win-rate intervals: Wilson's 95% score interval, a tie counting half a win.",
        _sweet_spot_method(data),
        "Rank correlations: Spearman's ρ over finished trials, with a 95% interval from Fisher's z using Bonett "
        "and Wright's standard error √((1 + ρ²/2)/(n − 3)); approximate with few trials.",
        "Parameter importance: ω² of a one-way ANOVA of the metric on each parameter alone, over finished "
        "trials (a numeric parameter with more than 6 values is cut into quartiles, of log10 when it spans more "
        "than a factor 10). Unlike a raw share of variance it is near 0% for a parameter without effect; "
        "interactions are not counted.",
        "Failed trials (error, diverged, out of memory) and running ones are drawn with their own markers where "
        "they have metrics, and always listed in the table; they never enter a frontier or a statistic.",
    ]
    return "<section><h2>How the numbers are computed</h2><ul class=\"methods\">" + "".join(
        f"<li>{escape(item)}</li>" for item in items
    ) + "</ul></section>"


def _date(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, tz=timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


# Sorts a table by the clicked column: numbers numerically, text naturally, missing values last
# either way; a second click reverses.
_SORT_JS = """
document.querySelectorAll("table.sortable").forEach(function (table) {
  var headers = Array.from(table.tHead.rows[0].cells);
  headers.forEach(function (th, column) {
    th.querySelector("button").addEventListener("click", function () {
      var ascending = th.getAttribute("aria-sort") !== "ascending";
      headers.forEach(function (h) { h.removeAttribute("aria-sort"); });
      th.setAttribute("aria-sort", ascending ? "ascending" : "descending");
      var body = table.tBodies[0];
      var rows = Array.from(body.rows);
      var key = function (row) {
        var cell = row.cells[column];
        return cell.dataset.sort !== undefined ? cell.dataset.sort : cell.textContent.trim();
      };
      var numeric = rows.every(function (row) { var k = key(row); return k === "" || !isNaN(Number(k)); });
      rows.sort(function (a, b) {
        var x = key(a), y = key(b);
        if (x === "" || y === "") { return (x === "") - (y === ""); }
        var order = numeric ? Number(x) - Number(y) : x.localeCompare(y, undefined, {numeric: true});
        return ascending ? order : -order;
      });
      rows.forEach(function (row) { body.appendChild(row); });
    });
  });
});
"""

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #222; margin: 0;
       background: #fafafa; line-height: 1.45; }
main { max-width: 1280px; margin: 0 auto; padding: 1.5rem 2rem 3rem; background: #fff; }
h1 { margin: 0 0 .2rem; font-size: 1.6rem; overflow-wrap: anywhere; }
h2 { font-size: 1.2rem; margin: 2rem 0 .6rem; border-bottom: 1px solid #ddd; padding-bottom: .2rem; }
h3 { font-size: 1rem; margin: 0 0 .3rem; }
.meta { color: #666; margin: 0; font-size: .9rem; overflow-wrap: anywhere; }
.summary { font-size: 1.02rem; background: #f1f6fb; border-left: 4px solid #1f77b4; padding: .2rem .9rem;
           margin: 1rem 0; }
.summary p { margin: .5rem 0; }
.summary .census { color: #555; font-size: .9rem; }
/* Two fixed columns: plotly sizes each figure when its script runs, before later figures exist. */
.grid { display: grid; grid-template-columns: repeat(2, minmax(0, 1fr)); gap: 1.2rem; }
.grid figure.wide { grid-column: 1 / -1; }
@media (max-width: 1000px) { .grid { grid-template-columns: minmax(0, 1fr); } }
figure { margin: 0; border: 1px solid #e6e6e6; border-radius: 4px; padding: .6rem; min-width: 0; }
figcaption, .caption, .note { color: #555; font-size: .9rem; }
.note { font-style: italic; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; font-size: .85rem; width: 100%; }
th, td { border-bottom: 1px solid #e6e6e6; padding: .3rem .4rem; text-align: left; vertical-align: top; }
th { background: #f4f4f4; }
th button { all: unset; cursor: pointer; }
th button:focus-visible { outline: 2px solid #1f77b4; }
th[aria-sort="ascending"] button::after { content: " ▲"; }
th[aria-sort="descending"] button::after { content: " ▼"; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
.interval { color: #777; }
a.download { white-space: nowrap; }
tr.status-early_stopped { background: #fff7ec; }
tr.status-error, tr.status-diverged, tr.status-oom { background: #fdeeee; }
tr.best { font-weight: 600; background: #f2f2f2; box-shadow: inset 4px 0 0 #111; }
tr.sweet-spot { font-weight: 600; background: #fbf3df; box-shadow: inset 4px 0 0 #b8860b; }
td.status, td.id, td.name { white-space: nowrap; }
.pick { font-size: .8rem; }
.error { color: #a11; font-family: ui-monospace, monospace; font-size: .8rem; }
table.trials td:last-child { min-width: 18ch; overflow-wrap: anywhere; }
details.error pre { white-space: pre-wrap; max-width: 60ch; }
table.samples td { max-width: 28ch; }
/* Judged texts wrap whole, never clipped nor scrolled inside their cell. */
.text { white-space: pre-wrap; overflow-wrap: anywhere; }
td.verdict { font-weight: 600; }
td.win { color: #2a7d2a; } td.tie { color: #8a6d00; } td.loss { color: #b22; }
ul.methods { color: #444; font-size: .88rem; padding-left: 1.2rem; }
ul.methods li { margin: .3rem 0; }
"""
