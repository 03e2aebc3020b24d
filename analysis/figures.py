"""The report's plotly figures: each draws one plot tuple of `analysis.report_data`, nothing more.

Every trace is SVG (no WebGL), so figures draw in any browser, headless ones included. Text that
plotly renders as HTML (trace names, hover text) is escaped here.
"""

from __future__ import annotations

import math
from html import escape
from typing import TYPE_CHECKING, Any, NamedTuple, Sequence

import numpy as np
import pandas as pd
import plotly.colors
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from analysis.load import training_id
from analysis.style import RECOMMENDATION_STYLE, cell, duration, label, num, style
from trainers.vocabulary import TrialStatus

if TYPE_CHECKING:
    from analysis.report_data import CurvesPlot, EffectsPlot, FrontierPlot, ImportancePlot, ParallelPlot, ScatterPlot

AXIS_LABELS = {
    "train_flops": "training compute in FLOPs (trial total)",
    "train_seconds": "training seconds measured on this machine (trial total)",
    "gpu_hours": "GPU-hours (trial total)",
    "cost_usd": "cost in USD (trial total)",
    "peak_memory_gb": "peak memory in GB",
}
COLOURSCALE = "Viridis"
BASE_COLOUR = "#2ca02c"
# Past this many trials the per-epoch curves are coloured and listed by status, not one entry per trial.
MAX_LEGEND_TRIALS = 10
PICK_SIZE = 18  # the marker of the best trial and of the sweet spot
MIN_TICK_GAP = 0.07  # of a parallel axis's height (about 300 pixels): a tick label's height, and some room

# Trial labels are placed so that no two overlap in a figure's plot area of any of these sizes in
# pixels (width, height): the report's two columns in a 1000- and a 1400-pixel window, one column
# below 1000. Axis ranges are set, not left to plotly, so that data maps to the same pixels.
PLOT_AREAS_PX = ((370, 250), (530, 270), (830, 270))
LABEL_FONT_PX = 10
LABEL_CHAR_PX = 5.5  # a character's width at LABEL_FONT_PX, generously (Arial: 4.2 on average in a label)
LABEL_HEIGHT_PX = 16  # a line at LABEL_FONT_PX with the annotation's padding
# Where a label may sit beside its point, in order of preference: (xanchor, yanchor, x side, y side);
LABEL_SPOTS = (
    ("center", "bottom", 0, 1),
    ("left", "middle", 1, 0),
    ("right", "middle", -1, 0),
    ("center", "top", 0, -1),
    ("left", "bottom", 1, 1),
    ("right", "bottom", -1, 1),
    ("left", "top", 1, -1),
    ("right", "top", -1, -1),
)
# then further off, with a line to its point: the label's centre this many pixels right and down of it.
LABEL_LEADERS = ((0, -40), (0, 40), (-60, -40), (60, -40), (-60, 40), (60, 40), (0, -65), (0, 65))


class Marks(NamedTuple):
    """How the figures name trials, and the trials the report recommends."""

    names: dict[str, str]  # trial_id -> "lr 1e-3 · r 16"; folded sweeps: each training's id too (its curve)
    picks: dict[str, str]  # "best", and "sweet_spot" when it is another trial -> trial_id
    epochs: dict[str, int]  # each pick's best epoch

    def kind(self, trial_id: str) -> str | None:
        return next((kind for kind, picked in self.picks.items() if picked == trial_id), None)

    def title(self, trial_id: str) -> str:
        """A trial's name, after "best: " or "sweet spot: " when it is one of those."""
        kind = self.kind(trial_id)
        name = self.names.get(trial_id, trial_id)
        return name if kind is None else f"{RECOMMENDATION_STYLE[kind][0]}: {name}"


class Label(NamedTuple):
    """A text to write beside the point (x, y), whose marker has `radius` pixels."""

    x: float
    y: float
    text: str
    radius: float


def frontier_figure(plot: FrontierPlot, params: list[str], marks: Marks) -> go.Figure:
    """Cost against one quality, every trial by status, the frontier as a step line, win-rate intervals as bars;
    the best and the sweet spot marked, and they and the frontier labelled by name."""
    fig = go.Figure()
    for status, group in plot.points.groupby("status", sort=False):
        fig.add_trace(_status_markers(group, status, plot.x, plot.y, params, marks, with_bars=plot.y == "win_rate"))
    front = plot.front
    fig.add_trace(
        go.Scatter(
            x=front[plot.x],
            y=front[plot.y],
            mode="lines+markers",
            name="Pareto frontier",
            line={"shape": "hv", "color": "#333", "width": 1.5},
            marker={"symbol": "circle-open", "size": 17, "color": "#333", "line": {"width": 2}},
            hoverinfo="skip",
        )
    )
    for trace in _pick_markers(plot.points, plot.x, plot.y, params, marks):
        fig.add_trace(trace)
    x_range = _range([plot.points[plot.x]])
    y_range = _range([plot.points[plot.y], *_bar_ends(plot.points, plot.y), [plot.reference]])
    obstacles = []
    if plot.reference is not None:
        base = f"base model {num(plot.reference)}"
        fig.add_hline(
            y=plot.reference,
            line={"dash": "dot", "color": BASE_COLOUR, "width": 1.5},
            annotation={"text": base, "font": {"color": BASE_COLOUR, "size": 11}},
            annotation_position="bottom right",
        )
        obstacles.append((x_range[1], plot.reference, base, "right", "top"))
    points = plot.points.set_index("trial_id", drop=False)
    chosen = [*_picked(points, marks), *[t for t in front["trial_id"] if marks.kind(t) is None]]
    labels = [Label(points.at[t, plot.x], points.at[t, plot.y], marks.title(t), 9) for t in chosen]
    _add_labels(fig, labels, x_range, y_range, points[[plot.x, plot.y]].to_numpy(), obstacles)
    fig.update_xaxes(range=x_range, exponentformat="SI")  # FLOPs read 665G, not plotly's default 665B
    fig.update_yaxes(range=y_range)
    better = "higher is better" if plot.y_mode == "max" else "lower is better"
    return _layout(fig, AXIS_LABELS.get(plot.x, plot.x), f"{label(plot.y)} at best epoch ({better})")


def curves_figure(plot: CurvesPlot, colours: dict[str, str], marks: Marks) -> go.Figure:
    """One line per trial named by what differs, the best's and the sweet spot's thick in their own colours with
    their mark on their best epoch, ◆ on each trial's best epoch; past MAX_LEGEND_TRIALS, by status."""
    picked = {training_id(t): kind for kind, t in reversed(marks.picks.items())}  # a shared training: the best's
    by_status = plot.curves["trial_id"].nunique() > MAX_LEGEND_TRIALS
    listed: set[str] = set()
    line_colours: dict[str, str] = {}
    fig = go.Figure()
    for trial_id, group in plot.curves.groupby("trial_id", sort=False):
        status = group["status"].iloc[0]
        status_label, symbol, status_colour, dash = style(status)
        legend: dict[str, Any] = {}
        name = marks.names.get(trial_id, trial_id)
        kind = picked.get(trial_id)
        if kind is not None:
            name, colour = f"{RECOMMENDATION_STYLE[kind][0]}: {name}", RECOMMENDATION_STYLE[kind][2]
        elif by_status:
            name, colour = status_label, status_colour
            legend = {"legendgroup": status, "showlegend": status not in listed, "opacity": 0.6}
            listed.add(status)
        else:
            name, colour = (name if status == TrialStatus.COMPLETED else f"{name} ({status_label})"), colours[trial_id]
        line_colours[trial_id] = colour
        hover = f"<b>{escape(marks.names.get(trial_id, trial_id))}</b><br>trial {escape(trial_id)}"
        fig.add_trace(
            go.Scatter(
                x=group["epoch"],
                y=group[plot.metric],
                mode="lines+markers",
                name=escape(name),
                line={"color": colour, "dash": dash, "width": 1.5 if kind is None else 3},
                marker={"symbol": symbol, "size": 7},
                hovertemplate=f"{hover}<br>epoch %{{x}}: %{{y:.4g}}<extra></extra>",
                **legend,
            )
        )
    if len(plot.best):
        diamond = {"symbol": "diamond", "size": 13, "line": {"color": "#fff", "width": 1.5}}
        fig.add_trace(  # the legend entry, in a neutral colour
            go.Scatter(x=[None], y=[None], mode="markers", name="best epoch", marker=diamond | {"color": "#666"})
        )
        fig.add_trace(
            go.Scatter(
                x=plot.best["epoch"],
                y=plot.best[plot.metric],
                mode="markers",
                name="best epoch",
                showlegend=False,
                marker={
                    "symbol": "diamond",
                    "size": 13,
                    "color": [line_colours.get(t, "#111") for t in plot.best["trial_id"]],
                    "line": {"color": "#fff", "width": 1.5},
                },
                hovertext=[
                    f"{escape(marks.names.get(t, t))} ({escape(t)}): best epoch {e}"
                    for t, e in zip(plot.best["trial_id"], plot.best["epoch"])
                ],
                hoverinfo="text",
            )
        )
    values = plot.curves.set_index(["trial_id", "epoch"])[plot.metric]
    for kind, trial_id in marks.picks.items():  # the mark on the epoch the recommendation is read at
        key = (training_id(trial_id), marks.epochs.get(trial_id))
        if key not in values.index:
            continue
        text, symbol, colour = RECOMMENDATION_STYLE[kind]
        fig.add_trace(
            go.Scatter(
                x=[key[1]],
                y=[values[key]],
                mode="markers",
                name=escape(f"{text}: {marks.names.get(trial_id, trial_id)}"),
                showlegend=picked.get(key[0]) != kind,  # its line is not already in the legend under this name
                marker={"symbol": symbol, "size": PICK_SIZE, "color": colour, "line": {"color": "#fff", "width": 1.5}},
                hovertext=[f"{escape(marks.title(trial_id))} ({escape(trial_id)}): epoch {key[1]}"],
                hoverinfo="text",
            )
        )
    fig.update_xaxes(dtick=1)
    return _layout(fig, "epoch", label(plot.metric))


def scatter_figure(plot: ScatterPlot, params: list[str], marks: Marks) -> go.Figure:
    """One quality against another across trials, by status, with the base model for reference; the best and the
    sweet spot marked and labelled."""
    fig = go.Figure()
    for status, group in plot.points.groupby("status", sort=False):
        fig.add_trace(_status_markers(group, status, plot.x, plot.y, params, marks, with_bars=plot.y == "win_rate"))
    for trace in _pick_markers(plot.points, plot.x, plot.y, params, marks):
        fig.add_trace(trace)
    ref_x, ref_y = plot.reference.get("x"), plot.reference.get("y")
    x_range = _range([plot.points[plot.x], [ref_x]])
    y_range = _range([plot.points[plot.y], *_bar_ends(plot.points, plot.y), [ref_y]])
    points = plot.points.set_index("trial_id", drop=False)
    labels = [Label(points.at[t, plot.x], points.at[t, plot.y], marks.title(t), 9) for t in _picked(points, marks)]
    others = points[[plot.x, plot.y]].to_numpy()
    obstacles = []
    if ref_x is not None and ref_y is not None:
        fig.add_trace(
            go.Scatter(
                x=[ref_x],
                y=[ref_y],
                mode="markers",
                name="base model",
                marker={"symbol": "star", "size": 15, "color": BASE_COLOUR, "line": {"color": "#fff", "width": 1}},
                hovertext=[f"base model: {label(plot.x)} {num(ref_x)}, {label(plot.y)} {num(ref_y)}"],
                hoverinfo="text",
            )
        )
        others = np.vstack([others, [[ref_x, ref_y]]])
    elif ref_x is not None:
        base = f"base model {num(ref_x)}"
        fig.add_vline(
            x=ref_x,
            line={"dash": "dot", "color": BASE_COLOUR, "width": 1.5},
            annotation={"text": base, "font": {"color": BASE_COLOUR, "size": 11}},
            annotation_position="top right",
        )
        obstacles.append((ref_x, y_range[1], base, "left", "top"))
    _add_labels(fig, labels, x_range, y_range, others, obstacles)
    fig.update_xaxes(range=x_range)
    fig.update_yaxes(range=y_range)
    return _layout(fig, f"{label(plot.x)} at best epoch", f"{label(plot.y)} at best epoch")


def effects_figure(plot: EffectsPlot, marks: Marks) -> go.Figure:
    """One panel per parameter: every trial's metric at its value, and the mean of finished trials per value."""
    cols = min(len(plot.params), 4)
    rows = math.ceil(len(plot.params) / cols)
    fig = make_subplots(
        rows=rows, cols=cols, shared_yaxes="all", horizontal_spacing=0.04, vertical_spacing=0.16,
        subplot_titles=[escape(p) for p in plot.params],
    )  # fmt: skip
    shown: set[str] = set()
    for i, param in enumerate(plot.params):
        row, col = i // cols + 1, i % cols + 1
        x_values = plot.points[param].map(lambda v: cell(v) if isinstance(v, (list, tuple)) else v)
        for status, group in plot.points.assign(_x=x_values).groupby("status", sort=False):
            bars = plot.metric == "win_rate"
            trace = _status_markers(group, status, "_x", plot.metric, [param], marks, with_bars=bars)
            trace.update(legendgroup=status, showlegend=status not in shown)
            shown.add(status)
            fig.add_trace(trace, row=row, col=col)
        for trace in _pick_markers(plot.points.assign(_x=x_values), "_x", plot.metric, [param], marks):
            trace.update(showlegend=i == 0)
            fig.add_trace(trace, row=row, col=col)
        means = plot.means[plot.means["param"] == param]
        if len(means):
            fig.add_trace(
                go.Scatter(
                    x=means["x"],
                    y=means["mean"],
                    mode="lines+markers",
                    name="mean of finished trials",
                    legendgroup="mean",
                    showlegend=i == 0,
                    line={"color": "#333", "width": 2},
                    marker={"symbol": "line-ew-open", "size": 16, "line": {"width": 3, "color": "#333"}},
                    hovertext=[
                        f"{escape(param)} {escape(str(r['level']))}: mean {num(r['mean'])} over {r['n']}"
                        for _, r in means.iterrows()
                    ],
                    hoverinfo="text",
                ),
                row=row,
                col=col,
            )
        numeric = not x_values.map(lambda v: isinstance(v, str)).any()
        distinct = sorted(x_values.dropna().unique()) if numeric else []
        if param in plot.log_x:
            fig.update_xaxes(type="log", row=row, col=col)
        elif not numeric:
            fig.update_xaxes(type="category", row=row, col=col)
        if 1 < len(distinct) <= 8:  # a grid: tick every value tried, no more
            fig.update_xaxes(tickvals=distinct, ticktext=[cell(float(v)) for v in distinct], row=row, col=col)
        elif param in plot.log_x:
            fig.update_xaxes(dtick=1, row=row, col=col)
    fig.update_yaxes(title_text=f"{label(plot.metric)} at best epoch", col=1)
    _layout(fig, None, None)
    fig.update_layout(height=360 * rows + 60)
    return fig


def parallel_figure(plot: ParallelPlot, marks: Marks) -> go.Figure:
    """Parallel coordinates drawn with SVG lines: each axis scaled to its own range, one line per trial; the best's
    and the sweet spot's outlined in their colours, with their marks on each axis."""
    lines = plot.lines
    positions, ticks = {}, []
    for i, axis in enumerate(plot.axes):
        scaled, axis_ticks = _axis_scale(lines[axis], axis in plot.log_axes)
        positions[axis] = scaled
        ticks += [(i, y, text) for y, text in axis_ticks]
    low, high = lines[plot.colour].min(), lines[plot.colour].max()
    span = high - low if high > low else 1.0
    fig = go.Figure()
    picked = {index: marks.kind(trial_id) for index, trial_id in lines["trial_id"].items()}
    # The best drawn last, on top; the recommended ones after all others.
    recommended = lines.index.map(lambda index: picked[index] is not None)
    order = lines.assign(_picked=recommended).sort_values(["_picked", plot.colour], na_position="first").index
    for index in order:
        row = lines.loc[index]
        colour = plotly.colors.sample_colorscale(COLOURSCALE, [(row[plot.colour] - low) / span])[0]
        status_label, _, _, dash = style(row["status"])
        hover = f"<b>{escape(marks.title(row['trial_id']))}</b><br>"
        hover += f"trial {escape(str(row['trial_id']))} ({escape(status_label)})<br>" + "<br>".join(
            f"{escape(a)} = {escape(cell(row[a]) if isinstance(row[a], (list, tuple, str)) else num(row[a]))}"
            for a in plot.axes
        )
        kind = picked[index]
        if kind is not None:  # an outline beneath its line, with its mark on each axis and its legend entry
            text, symbol, mark_colour = RECOMMENDATION_STYLE[kind]
            fig.add_trace(
                go.Scatter(
                    x=list(range(len(plot.axes))),
                    y=[positions[a][index] for a in plot.axes],
                    mode="lines+markers",
                    name=escape(f"{text}: {marks.names.get(row['trial_id'], row['trial_id'])}"),
                    legendrank=list(RECOMMENDATION_STYLE).index(kind),  # the best first, as elsewhere
                    line={"color": mark_colour, "width": 7},
                    marker={"symbol": symbol, "size": 14, "color": mark_colour, "line": {"color": "#fff", "width": 1}},
                    hovertext=hover,
                    hoverinfo="text",
                )
            )
        fig.add_trace(
            go.Scatter(
                x=list(range(len(plot.axes))),
                y=[positions[a][index] for a in plot.axes],
                mode="lines+markers",
                line={"color": colour, "width": 2.5} if row["eligible"] else {"color": colour, "dash": dash},
                marker={"size": 6, "color": colour},
                hovertext=hover,
                hoverinfo="text",
                showlegend=False,
            )
        )
    fig.add_trace(  # the colour bar alone
        go.Scatter(
            x=[None],
            y=[None],
            mode="markers",
            showlegend=False,
            hoverinfo="skip",
            marker={
                "color": [low, high],
                "colorscale": COLOURSCALE,
                "showscale": True,
                "cmin": low,
                "cmax": high,
                "colorbar": {"title": {"text": label(plot.colour), "side": "right"}, "thickness": 12},
            },
        )
    )
    for status in lines.loc[~lines["eligible"], "status"].unique():  # legend only for the dashed, unfinished ones
        status_label, _, _, dash = style(status)
        fig.add_trace(
            go.Scatter(
                x=[None], y=[None], mode="lines", name=escape(status_label), line={"color": "#888", "dash": dash}
            )
        )
    for i in range(len(plot.axes)):
        fig.add_shape(type="line", x0=i, x1=i, y0=0, y1=1, line={"color": "#999", "width": 1}, layer="below")
    for x, y, text in ticks:
        fig.add_annotation(
            x=x, y=y, text=escape(text), showarrow=False, xanchor="right", xshift=-4,
            font={"size": 10, "color": "#333"}, bgcolor="rgba(255,255,255,0.85)",
        )  # fmt: skip
    fig.update_xaxes(
        tickvals=list(range(len(plot.axes))),
        ticktext=[escape(a) for a in plot.axes],
        side="top",
        range=[-0.45, len(plot.axes) - 0.85],
        showgrid=False,
        zeroline=False,
    )
    fig.update_yaxes(visible=False, range=[-0.06, 1.06])
    _layout(fig, None, None)
    fig.update_layout(margin={"l": 60, "r": 10, "t": 40, "b": 10})
    return fig


def importance_figure(plot: ImportancePlot) -> go.Figure:
    """Each parameter's share of the metric's variance, largest on top; a parameter that cannot be estimated says so."""
    shown = plot.importances.iloc[::-1]
    shares = shown["share"].fillna(0.0) * 100
    texts = [f"{s:.0%}" if np.isfinite(s) else "not estimable" for s in shown["share"]]
    fig = go.Figure(
        go.Bar(
            x=shares,
            y=[escape(p) for p in shown["param"]],
            orientation="h",
            text=texts,
            textposition="outside",
            cliponaxis=False,
            marker={"color": "#1f77b4"},
            hovertext=[
                f"{escape(p)}: {t} over {n} values or ranges" for p, t, n in zip(shown["param"], texts, shown["levels"])
            ],
            hoverinfo="text",
            showlegend=False,
        )
    )
    ticks = [0, 20, 40, 60, 80, 100]
    fig.update_xaxes(range=[0, 105], tickvals=ticks, ticktext=[f"{t}%" for t in ticks])
    _layout(fig, f"share of the variance of {label(plot.metric)} explained (ω²)", None)
    fig.update_layout(bargap=0.4, height=max(220, 110 + 45 * len(shown)))
    return fig


def trial_colours(trial_ids: pd.Series) -> dict[str, str]:
    palette = plotly.colors.qualitative.D3
    return {trial_id: palette[i % len(palette)] for i, trial_id in enumerate(trial_ids)}


def _status_markers(
    group: pd.DataFrame, status: str, x: str, y: str, params: list[str], marks: Marks, *, with_bars: bool
) -> go.Scatter:
    status_label, symbol, colour, _ = style(status)
    bars = None
    if with_bars and "win_rate_low" in group:
        bars = {
            "type": "data",
            "array": (group["win_rate_high"] - group[y]).fillna(0).clip(lower=0),
            "arrayminus": (group[y] - group["win_rate_low"]).fillna(0).clip(lower=0),
            "thickness": 1,
            "width": 3,
            "color": colour,
        }
    return go.Scatter(
        x=group[x],
        y=group[y],
        mode="markers",
        name=escape(f"{status_label} ({len(group)})"),
        marker={"symbol": symbol, "color": colour, "size": 10, "opacity": 0.85},
        error_y=bars,
        hovertext=[_hover(row, y, params, marks) for _, row in group.iterrows()],
        hoverinfo="text",
    )


def _pick_markers(points: pd.DataFrame, x: str, y: str, params: list[str], marks: Marks) -> list[go.Scatter]:
    """The best's and the sweet spot's marks over their points, each with its legend entry."""
    traces = []
    for kind, trial_id in marks.picks.items():
        rows = points[points["trial_id"] == trial_id]
        if rows.empty:
            continue
        text, symbol, colour = RECOMMENDATION_STYLE[kind]
        traces.append(
            go.Scatter(
                x=rows[x],
                y=rows[y],
                mode="markers",
                name=escape(f"{text}: {marks.names.get(trial_id, trial_id)}"),
                legendgroup=kind,
                marker={"symbol": symbol, "size": PICK_SIZE, "color": colour, "line": {"color": "#fff", "width": 1.5}},
                hovertext=[_hover(row, y, params, marks) for _, row in rows.iterrows()],
                hoverinfo="text",
            )
        )
    return traces


def _picked(points: pd.DataFrame, marks: Marks) -> list[str]:
    """The recommended trials among `points` (indexed by trial_id): the best first."""
    return [t for t in marks.picks.values() if t in points.index]


def _hover(row: pd.Series, y: str, params: list[str], marks: Marks) -> str:
    status_label = style(row["status"])[0]
    lines = [
        f"<b>{escape(marks.title(row['trial_id']))}</b>",
        f"trial {escape(str(row['trial_id']))} ({escape(status_label)})",
    ]
    lines += [f"{escape(p)} = {escape(cell(row[p]))}" for p in params if p in row]
    at = f" at epoch {int(row['best_epoch'])}" if pd.notna(row.get("best_epoch")) else ""
    text = f"{escape(label(y))} {num(row[y])}{at}"
    if y == "win_rate" and pd.notna(row.get("win_rate_low")):
        text += f" [{num(row['win_rate_low'])}, {num(row['win_rate_high'])}]"
    lines.append(text)
    if pd.notna(row.get("train_seconds")):
        lines.append(f"{duration(row['train_seconds'])} of training")
    return "<br>".join(lines)


def _range(groups: Sequence[Any]) -> list[float]:
    """A linear axis range over every finite value of `groups`, with room for labels at both ends."""
    numbers = [pd.to_numeric(pd.Series(list(g), dtype=object), errors="coerce") for g in groups]
    values = np.concatenate([n.to_numpy(float) for n in numbers])
    values = values[np.isfinite(values)]
    if not len(values):
        return [0.0, 1.0]
    low, high = float(values.min()), float(values.max())
    pad = (high - low) * 0.1 if high > low else max(abs(low) * 0.1, 0.5)
    return [low - pad, high + pad]


def _bar_ends(points: pd.DataFrame, y: str) -> list[pd.Series]:
    """The win-rate intervals' ends, which the axis must hold too."""
    return [points["win_rate_low"], points["win_rate_high"]] if y == "win_rate" and "win_rate_low" in points else []


def _add_labels(
    fig: go.Figure,
    labels: list[Label],
    x_range: list[float],
    y_range: list[float],
    points: np.ndarray,
    obstacles: list[tuple[float, float, str, str, str]],
) -> None:
    """Each label as an annotation beside its point, where it overlaps no other label (nor `obstacles`, other
    annotations as (x, y, text, xanchor, yanchor)) in any of PLOT_AREAS_PX and covers the fewest `points`;
    a label with no such place is left out (the hover still names the trial)."""
    placed = [[_box(x, y, text, xanchor, yanchor, 0, 0, area, x_range, y_range) for area in PLOT_AREAS_PX]
              for x, y, text, xanchor, yanchor in obstacles]  # fmt: skip
    for label_ in labels:
        choice = None
        for spot in _spots(label_.radius + 2):
            boxes = [_spot_box(label_, spot, area, x_range, y_range) for area in PLOT_AREAS_PX]
            fits = all(0 <= b[0] and b[2] <= w and 0 <= b[1] and b[3] <= h for b, (w, h) in zip(boxes, PLOT_AREAS_PX))
            if not fits or any(_overlap(b, other[i]) for other in placed for i, b in enumerate(boxes)):
                continue
            covered = sum(_covers(boxes[0], p, PLOT_AREAS_PX[0], x_range, y_range) for p in points)
            if choice is None or covered < choice[0]:
                choice = (covered, boxes, spot)
            if covered == 0:
                break
        if choice is None:
            continue
        placed.append(choice[1])
        fig.add_annotation(
            x=label_.x, y=label_.y, text=escape(label_.text), borderpad=1,
            font={"size": LABEL_FONT_PX, "color": "#333"}, bgcolor="rgba(255,255,255,0.8)",
            **({"showarrow": False} | choice[2]),
        )  # fmt: skip


def _spots(gap: float) -> list[dict[str, Any]]:
    """The annotation settings of each place a label may take, `gap` pixels from its point's centre."""
    beside = []
    for xanchor, yanchor, x_side, y_side in LABEL_SPOTS:
        shift = gap * (0.75 if x_side and y_side else 1)  # on the diagonal, about as far as straight out
        beside.append({"xanchor": xanchor, "yanchor": yanchor, "xshift": x_side * shift, "yshift": y_side * shift})
    leaders = [
        {"showarrow": True, "ax": ax, "ay": ay, "arrowhead": 0, "arrowwidth": 1, "arrowcolor": "#999", "standoff": gap}
        for ax, ay in LABEL_LEADERS
    ]
    return beside + leaders


def _spot_box(
    label_: Label, spot: dict[str, Any], area: tuple[int, int], x_range: list[float], y_range: list[float]
) -> tuple[float, float, float, float]:
    """A label's box at one of its spots: beside its point, or centred at the end of its line (ax, ay)."""
    x, y, text = label_.x, label_.y, label_.text
    if spot.get("showarrow"):
        return _box(x, y, text, "center", "middle", spot["ax"], -spot["ay"], area, x_range, y_range)
    return _box(x, y, text, spot["xanchor"], spot["yanchor"], spot["xshift"], spot["yshift"], area, x_range, y_range)


def _box(
    x: float, y: float, text: str, xanchor: str, yanchor: str, xshift: float, yshift: float,
    area: tuple[int, int], x_range: list[float], y_range: list[float],
) -> tuple[float, float, float, float]:  # fmt: skip
    """An annotation's estimated box in pixels of `area`, from its top left: (left, top, right, bottom)."""
    px, py = _pixels(x, y, area, x_range, y_range)
    ax, ay = px + xshift, py - yshift
    w, h = len(text) * LABEL_CHAR_PX + 4, LABEL_HEIGHT_PX
    left = {"left": ax, "center": ax - w / 2, "right": ax - w}[xanchor]
    top = {"top": ay, "middle": ay - h / 2, "bottom": ay - h}[yanchor]
    return (left, top, left + w, top + h)


def _pixels(
    x: float, y: float, area: tuple[int, int], x_range: list[float], y_range: list[float]
) -> tuple[float, float]:
    """(x, y) in pixels of `area` from its top left, for the figure's axis ranges."""
    w, h = area
    return (x - x_range[0]) / (x_range[1] - x_range[0]) * w, (y_range[1] - y) / (y_range[1] - y_range[0]) * h


def _overlap(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _covers(
    box: tuple[float, ...], point: np.ndarray, area: tuple[int, int], x_range: list[float], y_range: list[float]
) -> bool:
    """Whether `box` covers part of a marker (5 pixels round) at `point`."""
    px, py = _pixels(float(point[0]), float(point[1]), area, x_range, y_range)
    return _overlap(box, (px - 5, py - 5, px + 5, py + 5))


def _axis_scale(values: pd.Series, log: bool) -> tuple[pd.Series, list[tuple[float, str]]]:
    """Values placed on [0, 1] for one parallel axis, and its tick labels (min, middle, max, or each category)."""
    if values.map(lambda v: isinstance(v, (list, tuple, str))).any():
        text = values.map(cell)
        categories = sorted(text.unique())
        step = 1 / max(1, len(categories) - 1)
        where = {c: (i * step if len(categories) > 1 else 0.5) for i, c in enumerate(categories)}
        return text.map(where), _spread([(where[c], c if len(c) <= 20 else c[:19] + "…") for c in categories])
    numeric = pd.to_numeric(values, errors="coerce").astype(float)
    scale = np.log10(numeric) if log else numeric
    low, high = scale.min(), scale.max()
    if not np.isfinite(low):
        return scale, []
    if high == low:
        return scale * 0 + 0.5, [(0.5, num(numeric.min()))]
    scaled = (scale - low) / (high - low)
    distinct = np.sort(numeric.dropna().unique())
    if len(distinct) <= 5:  # a grid: label every value
        ticks = [(float((np.log10(v) if log else v) - low) / (high - low), cell(float(v))) for v in distinct]
    else:
        middle = 10 ** ((low + high) / 2) if log else (low + high) / 2
        ticks = [(0.0, cell(float(numeric.min()))), (0.5, cell(float(middle))), (1.0, cell(float(numeric.max())))]
    return scaled, _spread(ticks)


def _spread(ticks: list[tuple[float, str]]) -> list[tuple[float, str]]:
    """The ticks of one parallel axis that do not overlap: both ends first, then each one far enough from those kept."""
    ends = [t for t in ticks if t[0] in (0.0, 1.0)]
    kept: list[tuple[float, str]] = []
    for tick in [*ends, *[t for t in ticks if t not in ends]]:
        if all(abs(tick[0] - other[0]) >= MIN_TICK_GAP for other in kept):
            kept.append(tick)
    return sorted(kept)


def _layout(fig: go.Figure, x_title: str | None, y_title: str | None) -> go.Figure:
    fig.update_layout(
        template="plotly_white",
        height=440,
        margin={"l": 60, "r": 10, "t": 30, "b": 10},
        legend={"orientation": "h", "x": 0, "y": -0.18, "yanchor": "top", "font": {"size": 11}},
        hoverlabel={"align": "left"},
    )
    if x_title is not None:
        fig.update_layout(xaxis_title=x_title)
    if y_title is not None:
        fig.update_layout(yaxis_title=y_title)
    return fig
