"""The report's plotly figures: each draws one plot tuple of `analysis.report_data`, nothing more.

Every trace is SVG (no WebGL), so figures draw in any browser, headless ones included. Text that
plotly renders as HTML (trace names, hover text) is escaped here.
"""

from __future__ import annotations

import math
from html import escape
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import plotly.colors
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from analysis.load import training_id
from analysis.style import cell, duration, label, num, style
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
# Trial ids written next to the points of a scatter up to this many points.
MAX_POINT_LABELS = 12
# Past this many trials the per-epoch curves are coloured and listed by status, not one entry per trial.
MAX_LEGEND_TRIALS = 10


def frontier_figure(plot: FrontierPlot, params: list[str]) -> go.Figure:
    """Cost against one quality, every trial by status, the frontier as a step line, win-rate intervals as bars."""
    fig = go.Figure()
    for status, group in plot.points.groupby("status", sort=False):
        fig.add_trace(_status_markers(group, status, plot.x, plot.y, params, with_bars=plot.y == "win_rate"))
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
    if plot.reference is not None:
        fig.add_hline(
            y=plot.reference,
            line={"dash": "dot", "color": BASE_COLOUR, "width": 1.5},
            annotation={"text": f"base model {num(plot.reference)}", "font": {"color": BASE_COLOUR, "size": 11}},
            annotation_position="bottom right",
        )
    better = "higher is better" if plot.y_mode == "max" else "lower is better"
    return _layout(fig, AXIS_LABELS.get(plot.x, plot.x), f"{label(plot.y)} at best epoch ({better})")


def curves_figure(plot: CurvesPlot, colours: dict[str, str], best_trial: str | None) -> go.Figure:
    """One line per trial, the best black and thick, ◆ on each best epoch; past MAX_LEGEND_TRIALS, by status."""
    best_training = None if best_trial is None else training_id(best_trial)
    by_status = plot.curves["trial_id"].nunique() > MAX_LEGEND_TRIALS
    listed: set[str] = set()
    line_colours: dict[str, str] = {}
    fig = go.Figure()
    for trial_id, group in plot.curves.groupby("trial_id", sort=False):
        status = group["status"].iloc[0]
        status_label, symbol, status_colour, dash = style(status)
        legend: dict[str, Any] = {}
        if trial_id == best_training:
            name, colour = f"{trial_id} ★ best", "#111"
        elif by_status:
            name, colour = status_label, status_colour
            legend = {"legendgroup": status, "showlegend": status not in listed, "opacity": 0.6}
            listed.add(status)
        else:
            name, colour = (trial_id if status == TrialStatus.COMPLETED else f"{trial_id} ({status_label})"), colours[trial_id]
        line_colours[trial_id] = colour
        fig.add_trace(
            go.Scatter(
                x=group["epoch"],
                y=group[plot.metric],
                mode="lines+markers",
                name=escape(name),
                line={"color": colour, "dash": dash, "width": 3 if trial_id == best_training else 1.5},
                marker={"symbol": symbol, "size": 7},
                hovertemplate=f"{escape(trial_id)}<br>epoch %{{x}}: %{{y:.4g}}<extra></extra>",
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
                hovertext=[f"{escape(t)}: best epoch {e}" for t, e in zip(plot.best["trial_id"], plot.best["epoch"])],
                hoverinfo="text",
            )
        )
    fig.update_xaxes(dtick=1)
    return _layout(fig, "epoch", label(plot.metric))


def scatter_figure(plot: ScatterPlot, params: list[str]) -> go.Figure:
    """One quality against another across trials, by status, with the base model for reference."""
    fig = go.Figure()
    labelled = len(plot.points) <= MAX_POINT_LABELS
    for status, group in plot.points.groupby("status", sort=False):
        trace = _status_markers(group, status, plot.x, plot.y, params, with_bars=plot.y == "win_rate")
        if labelled:
            trace.update(mode="markers+text", text=[escape(t) for t in group["trial_id"]], textposition="top center")
            trace.update(textfont={"size": 10, "color": "#555"})
        fig.add_trace(trace)
    ref_x, ref_y = plot.reference.get("x"), plot.reference.get("y")
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
    elif ref_x is not None:
        fig.add_vline(
            x=ref_x,
            line={"dash": "dot", "color": BASE_COLOUR, "width": 1.5},
            annotation={"text": f"base model {num(ref_x)}", "font": {"color": BASE_COLOUR, "size": 11}},
            annotation_position="top right",
        )
    return _layout(fig, f"{label(plot.x)} at best epoch", f"{label(plot.y)} at best epoch")


def effects_figure(plot: EffectsPlot) -> go.Figure:
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
            trace = _status_markers(group, status, "_x", plot.metric, [param], with_bars=plot.metric == "win_rate")
            trace.update(legendgroup=status, showlegend=status not in shown)
            shown.add(status)
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


def parallel_figure(plot: ParallelPlot) -> go.Figure:
    """Parallel coordinates drawn with SVG lines: each axis scaled to its own range, one line per trial."""
    lines = plot.lines
    positions, ticks = {}, []
    for i, axis in enumerate(plot.axes):
        scaled, axis_ticks = _axis_scale(lines[axis], axis in plot.log_axes)
        positions[axis] = scaled
        ticks += [(i, y, text) for y, text in axis_ticks]
    low, high = lines[plot.colour].min(), lines[plot.colour].max()
    span = high - low if high > low else 1.0
    fig = go.Figure()
    order = lines.sort_values(plot.colour, na_position="first").index  # the best drawn last, on top
    for index in order:
        row = lines.loc[index]
        colour = plotly.colors.sample_colorscale(COLOURSCALE, [(row[plot.colour] - low) / span])[0]
        status_label, _, _, dash = style(row["status"])
        hover = f"<b>{escape(str(row['trial_id']))}</b> ({escape(status_label)})<br>" + "<br>".join(
            f"{escape(a)} = {escape(cell(row[a]) if isinstance(row[a], (list, tuple, str)) else num(row[a]))}"
            for a in plot.axes
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
    group: pd.DataFrame, status: str, x: str, y: str, params: list[str], *, with_bars: bool
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
        hovertext=[_hover(row, y, params) for _, row in group.iterrows()],
        hoverinfo="text",
    )


def _hover(row: pd.Series, y: str, params: list[str]) -> str:
    status_label = style(row["status"])[0]
    lines = [f"<b>{escape(str(row['trial_id']))}</b> ({escape(status_label)})"]
    lines += [f"{escape(p)} = {escape(cell(row[p]))}" for p in params if p in row]
    at = f" at epoch {int(row['best_epoch'])}" if pd.notna(row.get("best_epoch")) else ""
    text = f"{escape(label(y))} {num(row[y])}{at}"
    if y == "win_rate" and pd.notna(row.get("win_rate_low")):
        text += f" [{num(row['win_rate_low'])}, {num(row['win_rate_high'])}]"
    lines.append(text)
    if pd.notna(row.get("train_seconds")):
        lines.append(f"{duration(row['train_seconds'])} of training")
    return "<br>".join(lines)


def _axis_scale(values: pd.Series, log: bool) -> tuple[pd.Series, list[tuple[float, str]]]:
    """Values placed on [0, 1] for one parallel axis, and its tick labels (min, middle, max, or each category)."""
    if values.map(lambda v: isinstance(v, (list, tuple, str))).any():
        text = values.map(cell)
        categories = sorted(text.unique())
        step = 1 / max(1, len(categories) - 1)
        where = {c: (i * step if len(categories) > 1 else 0.5) for i, c in enumerate(categories)}
        return text.map(where), [(where[c], c if len(c) <= 20 else c[:19] + "…") for c in categories]
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
    return scaled, ticks


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
