"""The report's data step: everything the report shows, as plain values that tests assert on.

Which points each figure draws, frontier membership, the statistics and every caption's numbers;
`analysis.report` only renders them. Text here is plain, never HTML: it is escaped once, when rendered.
"""

from __future__ import annotations

import math
import re
from functools import partial
from typing import Any, NamedTuple

import numpy as np
import pandas as pd

from analysis.frontier import pareto_front
from analysis.load import (
    Results,
    best_epoch_of,
    cost_metric,
    load_answers,
    load_epochs,
    load_judgments,
    load_results,
    load_trials,
    param_columns,
    rank_trials,
    selection_objective,
    training_id,
)
from analysis.stats import (
    Correlation,
    PairedDifference,
    SignTest,
    levels,
    paired_difference,
    sign_test,
    spearman,
    variance_explained,
)
from analysis.style import STATUS_STYLE, cell, duration, flops, label, missing, num, plural, sentence_case, style
from analysis.style import NAME_SEPARATOR, NOT_JUDGED, compact, short, verdict_word
from hpo.store import Store
from trainers.vocabulary import FINISHED, TrialStatus, whole_number_fields

SAMPLES_PER_VERDICT = 4
# The sign test's level: a cheaper trial whose p-value is at least this is "not significantly worse".
ALPHA = 0.05
# A cheaper trial is recommended only if it saves at least this share of the best's cost (report.min_saving).
MIN_SAVING = 0.2
# report.margin: a claim of "as good as" needs at least this many prompts both trials were judged on.
MIN_PAIRS = 10
# Fewer finished trials than this give no parameter importances.
MIN_TRIALS_FOR_IMPORTANCE = 3


class FrontierPlot(NamedTuple):
    title: str
    x: str  # the cost axis, minimised
    y: str
    y_mode: str
    points: pd.DataFrame  # trials with both x and y known, plus `eligible` and `on_front`
    reference: float | None  # the base model's y (win rate 0.5: it ties itself)
    caption: str

    @property
    def front(self) -> pd.DataFrame:
        """The frontier points, cheapest first: the step line."""
        return self.points[self.points["on_front"]].sort_values([self.x, self.y])


class CurvesPlot(NamedTuple):
    title: str
    metric: str
    curves: pd.DataFrame  # trial_id, status, epoch, <metric>: one row per point, trials best first
    best: pd.DataFrame  # trial_id, epoch, <metric>: each training's best epoch by the selection metric
    caption: str


class ScatterPlot(NamedTuple):
    """One quality against another across trials, with their rank correlation over the finished ones."""

    title: str
    x: str
    y: str
    points: pd.DataFrame  # trials with both values, plus `eligible` (finished)
    correlation: Correlation
    reference: dict[str, float]  # the base model's point ({"x": ..., "y": ...}; either may be missing)
    caption: str


class EffectsPlot(NamedTuple):
    title: str
    metric: str
    params: list[str]  # the parameters that vary, one panel each
    log_x: list[str]  # those drawn on a log axis
    points: pd.DataFrame  # trials with the metric, plus `eligible`
    means: pd.DataFrame  # param, level, x, mean, n: finished trials averaged per value (or range)
    caption: str


class ParallelPlot(NamedTuple):
    title: str
    axes: list[str]  # varying parameters, then the cost and the qualities
    log_axes: list[str]
    colour: str  # the metric the lines are coloured by
    lines: pd.DataFrame  # trial_id, status, eligible, one column per axis: trials with `colour`
    caption: str


class ImportancePlot(NamedTuple):
    title: str
    metric: str
    importances: pd.DataFrame  # param, share (omega squared; NaN when not estimable), levels
    n: int  # finished trials it is computed over
    caption: str


class SweetSpot(NamedTuple):
    best: str
    cheapest: str | None  # the cheapest trial worth taking instead (the best itself if none); None: no verdicts
    test: SignTest | None  # best vs cheapest, over their shared prompts; None when cheapest is best
    cost_ratio: float | None  # best's cost / cheapest's cost
    sentences: list[str]  # the report's headline: whether fine-tuning helped, the best, the sweet spot
    saving: float = 0.0  # the share of the best's cost the sweet spot saves (at least min_saving)
    difference: PairedDifference | None = None  # its win rate minus the best's, prompt by prompt, with a 95% interval
    helped: bool | None = None  # the best beat the base model (None: nothing to tell it by)
    min_saving: float = MIN_SAVING
    margin: float | None = None

    @property
    def why(self) -> list[str]:
        """The headline but for the sentence naming the best: whether fine-tuning helped, and the sweet spot's reason."""
        at = 1 if self.helped is False else 0
        return self.sentences[:at] + self.sentences[at + 1 :]


class Samples(NamedTuple):
    trial_id: str
    epoch: int
    rows: pd.DataFrame  # prompt_id, prompt, reference, base_answer, answer, verdict
    caption: str


class ReportData(NamedTuple):
    sweep: dict[str, Any]
    params: list[str]
    metric: str  # picks each trial's best epoch and the best trial
    cost: str  # the cost axis
    census: str
    sweet_spot: SweetSpot | None
    trials: pd.DataFrame  # load_trials, finished trials best first
    best_trial: str | None
    frontiers: list[FrontierPlot]
    curves: list[CurvesPlot]
    paradox: ScatterPlot | None
    retention: ScatterPlot | None
    effects: EffectsPlot | None
    parallel: ParallelPlot | None
    importance: ImportancePlot | None
    notes: list[str]  # why a figure is missing
    samples: Samples | None
    names: pd.Series  # each trial's name by what differs ("lr 1e-3 · r 16"), by trial_id
    recommendation: pd.Series  # each trial's part in the recommendation ("best", "sweet_spot" or ""), by trial_id

    @property
    def headline(self) -> list[str]:
        """The sentences at the top: the best trial and the sweet spot, or why there is none."""
        if self.sweet_spot is None:
            return ["No trial has finished with metrics yet."]
        return self.sweet_spot.sentences

    @property
    def sections(self) -> list[tuple[str, list]]:
        """The figures in page order, by section; missing ones left out."""
        quality = [p for p in (self.paradox, self.retention) if p is not None]
        parameters = [p for p in (self.effects, self.parallel, self.importance) if p is not None]
        return [
            ("Cost vs performance", list(self.frontiers)),
            ("Per-epoch curves", list(self.curves)),
            ("Does a lower perplexity mean a better model?", quality),
            ("What each parameter does", parameters),
        ]

    @property
    def figure_count(self) -> int:
        return sum(len(plots) for _, plots in self.sections)



def trial_names(trials: pd.DataFrame, params: list[str]) -> pd.Series:
    """Each trial named by the parameters whose values differ among `trials`, by trial_id: "lr 1e-3 · r 16".

    Short parameter names and compact numbers (analysis.style.PARAM_SHORT, compact), each parameter's
    in one notation (1e-3 and 1e-2, not 0.01, when any of its values needs an exponent); a parameter a
    trial lacks (another method's) is left out of its name. When nothing differs every parameter is
    named; trials that would share a name (repeated seeds) get #1, #2, ... in trial_id order.
    """
    texts = {}
    for p in (p for p in params if p in trials):
        values = [v for v in trials[p] if not _absent(v)]
        # One notation per parameter: 1e-4, 1e-3, 1e-2 rather than 1e-4, 1e-3, 0.01.
        scientific = any("e" in compact(v) for v in values if isinstance(v, float))
        texts[p] = [None if _absent(v) else compact(v, scientific) for v in trials[p]]
    differing = [p for p, values in texts.items() if len(set(values)) > 1] or list(texts)
    names = []
    for i, trial_id in enumerate(trials["trial_id"]):
        parts = [f"{short(p)} {texts[p][i]}".strip() for p in differing if texts[p][i] is not None]
        names.append(NAME_SEPARATOR.join(parts) or str(trial_id))
    named = pd.Series(names, index=trials["trial_id"].to_numpy(), dtype=object)
    for name, same in named.groupby(named, sort=False):
        if len(same) > 1:
            for n, trial_id in enumerate(sorted(same.index), start=1):
                named[trial_id] = f"{name} #{n}"
    return named


def recommendations(trials: pd.DataFrame, spot: SweetSpot | None) -> pd.Series:
    """Each trial's part in the report's recommendation, by trial_id: "best", "sweet_spot" or "".

    From sweet_spot()'s choice: the sweet spot is marked only when it is another trial than the best.
    """
    marks = pd.Series("", index=trials["trial_id"].to_numpy(), dtype=object, name="recommendation")
    if spot is not None:
        marks[spot.best] = "best"
        if spot.cheapest is not None and spot.cheapest != spot.best:
            marks[spot.cheapest] = "sweet_spot"
    return marks


def with_recommendation(trials: pd.DataFrame, spot: SweetSpot | None) -> pd.DataFrame:
    """`trials` with the `recommendation` column last: the columns of `peftsweep export`, counts as integers."""
    return whole_numbers(trials.assign(recommendation=trials["trial_id"].map(recommendations(trials, spot))))


def whole_numbers(trials: pd.DataFrame) -> pd.DataFrame:
    """`trials` with the columns that count things (wins, tokens, epochs) as integers: 3, not 3.0; missing stays missing.

    pandas keeps such a column as floats when a value is missing (NaN), and writes 3.0.
    """
    out = trials.copy()
    for column in whole_number_fields():
        if column in out and pd.api.types.is_float_dtype(out[column]):
            values = out[column].dropna()
            if (values == values.round()).all():  # a count measured otherwise (a mean) keeps its fraction
                out[column] = out[column].astype("Int64")
    return out


def by_trial(trials: pd.DataFrame) -> pd.DataFrame:
    """`trials` ordered by trial id (numbers in ids by value); a folded grid's rows, <trial_id>@<epochs>, by epochs."""

    def key(trial_id: str) -> tuple:
        trained, _, epochs = str(trial_id).partition("@")
        parts = re.split(r"(\d+)", trained)  # text and numbers alternate, so keys compare part by part
        return (tuple(int(p) if i % 2 else p for i, p in enumerate(parts)), int(epochs) if epochs.isdigit() else -1)

    order = sorted(range(len(trials)), key=lambda i: key(trials["trial_id"].iloc[i]))
    return trials.iloc[order].reset_index(drop=True)


def report_data(store: Store | Results) -> ReportData:
    """Everything the report shows, as plain values, from one read of the store."""
    results = store if isinstance(store, Results) else load_results(store)
    sweep = results.sweep
    params = param_columns(results)
    epochs = load_epochs(results)
    metric, mode = selection_objective(sweep["objectives"], epochs)
    loaded = load_trials(results)
    cost = cost_metric(results.spec, loaded)
    trials = rank_trials(loaded, metric, mode, cost)
    finished = trials[trials["status"].isin(FINISHED) & trials[metric].notna()]
    best = finished.iloc[0] if len(finished) else None
    baseline = results.baseline_metrics
    notes: list[str] = _judge_notes(epochs, sweep["name"])

    frontiers = []
    panels = [
        (cost, "win_rate", "max", "cost vs win rate", 0.5),
        (cost, "eval_ppl", "min", "cost vs perplexity", baseline.get("eval_ppl")),
    ]
    if cost != "train_seconds":  # win rate against compute time too: what more training bought
        panels.append(("train_seconds", "win_rate", "max", "training time vs win rate", 0.5))
    for x, y, y_mode, title, reference in panels:
        plot = _frontier_plot(trials, x, y, y_mode, title, reference)
        if plot:
            frontiers.append(plot)
        elif x == cost:
            notes.append(f"No trial has reported {y} yet, so there is no {title} figure.")

    order: dict[str, int] = {}
    for i, trial_id in enumerate(trials["trial_id"]):
        order.setdefault(training_id(trial_id), i)  # folded rows (id@epochs) share one training's curve
    best_epochs = _best_epochs(epochs, metric, mode)
    curves = []
    for y, y_mode in (("eval_ppl", "min"), ("win_rate", "max")):
        plot = _curves_plot(epochs, order, best_epochs, y, y_mode, metric)
        if plot:
            curves.append(plot)
        else:
            notes.append(f"No trial has reported {y} yet, so there are no per-epoch curves of it.")

    paradox = _paradox_plot(trials, baseline)
    if paradox is None:
        notes.append("The perplexity paradox needs trials with both eval_ppl and win_rate; there are none yet.")
    retention = _retention_plot(trials, baseline)
    if retention is None:
        notes.append(
            "No trial has a retention_ppl (give eval.retention_data for a model other than tiny), "
            "so there is no figure of what fine-tuning forgot."
        )

    # Parameter effects are read on the win rate when there is one: what the user decides on.
    quality = "win_rate" if trials["win_rate"].notna().any() else "eval_ppl"
    varying = [p for p in params if trials.loc[trials[quality].notna(), p].map(cell).nunique() > 1]
    effects = _effects_plot(trials, varying, quality) if varying else None
    parallel = _parallel_plot(trials, varying, quality, cost, best) if varying else None
    importance = _importance_plot(trials, varying, quality) if varying else None
    if not varying:
        notes.append(
            f"No searched parameter took two values among trials with {quality}, so there are no parameter figures."
        )
    elif importance is None:
        n = int((trials["status"].isin(FINISHED) & trials[quality].notna()).sum())
        notes.append(
            f"Parameter importances need at least {MIN_TRIALS_FOR_IMPORTANCE} finished trials with "
            f"{quality}; there {'is' if n == 1 else 'are'} {n}."
        )

    spot = None if best is None else sweet_spot(
        trials, load_judgments(results, trials), params, metric, cost,
        min_saving=results.spec.report.min_saving, margin=results.spec.report.margin, baseline=baseline,
    )  # fmt: skip
    return ReportData(
        sweep=sweep,
        params=params,
        metric=metric,
        cost=cost,
        census=_census(trials),
        sweet_spot=spot,
        trials=trials,
        best_trial=None if best is None else best["trial_id"],
        frontiers=frontiers,
        curves=curves,
        paradox=paradox,
        retention=retention,
        effects=effects,
        parallel=parallel,
        importance=importance,
        notes=notes,
        samples=None if best is None else _samples(results, best),
        names=trial_names(trials, params),
        recommendation=recommendations(trials, spot),
    )


def sweet_spot(
    trials: pd.DataFrame,
    judgments: pd.DataFrame,
    params: list[str],
    metric: str,
    cost: str,
    *,
    min_saving: float = MIN_SAVING,
    margin: float | None = None,
    baseline: dict[str, Any] | None = None,
    alpha: float = ALPHA,
) -> SweetSpot:
    """The best trial, and the cheapest finished trial worth taking instead: one that saves at least
    `min_saving` of the best's cost and whose win rate is not significantly worse (or, with `margin`,
    provably at most `margin` worse: the 95% interval of their paired difference lies above -margin,
    over at least MIN_PAIRS shared prompts).

    `trials` is ranked (finished first, best first); `judgments` is load_judgments: each trial's
    verdicts against the base model at its best epoch. Candidates are compared with the best, cheapest
    first, over the prompts both were judged on: by an exact two-sided sign test (a prompt counts for
    the trial whose verdict is higher; equal verdicts are dropped; "not significantly worse" is p >= alpha
    or more prompts for the candidate), or with `margin` by the paired difference's t interval.
    Not significantly worse is not proven equal: with 50 prompts only large differences show.
    `baseline` (the base model's metrics) says whether fine-tuning helped at all.
    """
    finished = trials[trials["status"].isin(FINISHED) & trials[metric].notna()]
    best = finished.iloc[0]
    helped, verdict = fine_tuning_helped(best, baseline or {})
    sentences = [] if helped is not False else [verdict]
    sentences.append(
        f"Best by {label(metric)}: trial {best['trial_id']} ({_config(best, params)}) with "
        f"{_qualities(best, metric)}, {_cost(cost, best[cost])}."
    )
    spot = partial(SweetSpot, best["trial_id"], helped=helped, min_saving=min_saving, margin=margin)
    verdicts = {tid: group.set_index("prompt_id")["verdict"] for tid, group in judgments.groupby("trial_id")}
    if best["trial_id"] not in verdicts:
        sentences.append("No per-prompt verdicts are stored for it, so there is no paired test of cheaper trials.")
        return spot(None, None, None, sentences)
    if not best[cost] > 0:  # unknown (NaN: not measured), or nothing on this axis: no share of it can be saved
        what = "unknown (not measured)" if pd.isna(best[cost]) else "zero"
        sentences.append(f"No cheaper trial can be recommended: {best['trial_id']}'s {label(cost)} is {what}.")
        return spot(None, None, None, sentences)

    worth = finished[(finished[cost] <= (1 - min_saving) * best[cost]) & finished["trial_id"].isin(verdicts)]
    worth = worth.sort_values(cost, kind="stable")  # stable: the better one first among equal costs
    tested = 0
    for _, candidate in worth.iterrows():
        a, b = verdicts[best["trial_id"]].align(verdicts[candidate["trial_id"]], join="inner")
        if a.empty:
            continue
        tested += 1
        test = sign_test(a.to_numpy(), b.to_numpy())
        difference = paired_difference(a.to_numpy(), b.to_numpy())
        if margin is None:
            if test.p_value < alpha and test.better > test.worse:
                continue
            why = (
                f"is not significantly worse than {best['trial_id']}: on {test.shared} shared prompts {best['trial_id']} was "
                f"judged better on {test.better}, {candidate['trial_id']} on {test.worse}, equal on {test.equal} "
                f"(exact two-sided sign test, {_p(test.p_value)}, level {alpha:g}; not significantly worse is not proven equal)"
            )
        else:
            if difference.n < MIN_PAIRS or not difference.low >= -margin:
                continue
            why = (
                f"is as good as {best['trial_id']} within a margin of {margin:g} win rate: over {difference.n} shared prompts "
                f"the 95% interval of their paired difference in win rate, {difference.low:+.3f} to {difference.high:+.3f}, "
                f"lies above -{margin:g}"
            )
        saving = 1 - candidate[cost] / best[cost]
        sentences.append(
            f"Sweet spot: trial {candidate['trial_id']} ({_config(candidate, params)}) costs {_saving(saving)} less: "
            f"{_cost(cost, candidate[cost])}, against {_amount(cost, best[cost])}; with {_qualities(candidate, metric)}, it {why}."
        )
        return spot(candidate["trial_id"], test, best[cost] / candidate[cost] if candidate[cost] > 0 else math.inf,
                    sentences, saving=saving, difference=difference)  # fmt: skip

    none = "No configuration is meaningfully cheaper at the same quality: "
    share = f"at least {_saving(min_saving)} of {best['trial_id']}'s {label(cost)}"
    saving_enough = int((finished[cost] <= (1 - min_saving) * best[cost]).sum())
    cheaper = int(finished[cost].lt(best[cost]).sum())
    if saving_enough == 0:
        less = "the one cheaper trial saves less" if cheaper == 1 else f"the {cheaper} cheaper trials save less"
        sentences.append(none + f"no finished trial saves {share}" + (
            f" ({less})." if cheaper else f"; {best['trial_id']} is also the cheapest."
        ))  # fmt: skip
    elif tested == 0:
        which = "the one trial that saves" if saving_enough == 1 else f"none of the {saving_enough} trials that save"
        sentences.append(none + f"{which} {share} has verdicts on prompts shared with {best['trial_id']}.")
        return spot(None, None, None, sentences)
    elif margin is None:
        which = "the one trial that saves" if tested == 1 else f"each of the {tested} trials that save"
        sentences.append(
            none + f"{which} {share} and shares judged prompts with it is significantly worse "
            f"(exact two-sided sign test over shared prompts, p < {alpha:g})."
        )
    else:
        which = "the one trial that saves" if tested == 1 else f"any of the {tested} trials that save"
        sentences.append(
            none + f"for {which} {share} and shares judged prompts with it, the 95% interval of the paired "
            f"difference in win rate does not lie above -{margin:g} over at least {MIN_PAIRS} shared prompts."
        )
    return spot(best["trial_id"], None, 1.0, sentences)


def fine_tuning_helped(best: pd.Series, baseline: dict[str, Any]) -> tuple[bool | None, str]:
    """Whether the best trial beat the base model, and if not, the sentence that says so: its win rate's
    95% interval lies above 0.5 (a tie with the base model), or without verdicts its eval perplexity is
    below the base model's. None: nothing to tell it by."""
    if pd.notna(best.get("win_rate_low")) and pd.notna(best.get("win_rate_high")):
        low, high = best["win_rate_low"], best["win_rate_high"]
        if low > 0.5:
            return True, ""
        where = "includes 0.5, a tie with the base model" if high >= 0.5 else "lies below 0.5: the base model answers better"
        return False, (
            f"Fine-tuning did not clearly help: the best trial's win rate against the base model, {num(best['win_rate'])} "
            f"(95% CI {low:.2f}–{high:.2f}), {where}."
        )
    base_ppl = baseline.get("eval_ppl")
    if pd.notna(best.get("eval_ppl")) and base_ppl is not None:
        if best["eval_ppl"] < base_ppl:
            return True, ""
        return False, (
            f"Fine-tuning did not help: the best trial's eval perplexity, {num(best['eval_ppl'])}, is not below the "
            f"base model's {num(base_ppl)}."
        )
    return None, ""


def _frontier_plot(
    trials: pd.DataFrame, cost: str, y: str, y_mode: str, title: str, reference: float | None
) -> FrontierPlot | None:
    plotted = trials[trials[cost].notna() & trials[y].notna()]
    if plotted.empty:
        return None
    eligible = plotted["status"].isin(FINISHED)
    on_front = pareto_front(plotted[eligible], {cost: "min", y: y_mode})
    points = plotted.assign(eligible=eligible, on_front=on_front.reindex(plotted.index, fill_value=False))

    front = points[points["on_front"]].sort_values(cost)
    name = label(y)
    if front.empty:
        caption = f"No finished trial has reported {name} yet; the {len(points)} shown are running or failed"
    elif len(front) == 1:
        only = front.iloc[0]
        caption = (
            f"Trial {only['trial_id']} alone is on the frontier, both cheapest and best: "
            f"{name} {num(only[y])}, {_cost(cost, only[cost])}"
        )
    else:
        cheap, top = front.iloc[0], front.iloc[-1]
        caption = (
            f"{len(front)} of {int(eligible.sum())} finished trials are on the frontier, from {cheap['trial_id']} "
            f"({name} {num(cheap[y])}, {_cost(cost, cheap[cost])}) to {top['trial_id']} "
            f"({name} {num(top[y])}, {_cost(cost, top[cost])})"
        )
    if y == "win_rate" and points["win_rate_low"].notna().any():
        half = ((points["win_rate_high"] - points["win_rate_low"]) / 2).median()
        caption += f"; bars are 95% intervals, median ±{num(half)}, so smaller differences are mostly noise"
    left_out = len(trials) - len(points)
    if left_out:
        verb = "is" if left_out == 1 else "are"
        caption += f"; {plural(left_out, 'trial')} without these metrics {verb} only in the table"
    return FrontierPlot(
        title=title, x=cost, y=y, y_mode=y_mode, points=points, reference=reference, caption=caption + "."
    )


def _best_epochs(epochs: pd.DataFrame, metric: str, mode: str) -> pd.DataFrame:
    """Each training's best epoch by the selection metric, as load_trials picks it (trial_id, epoch)."""
    rows = []
    for trial_id, own in epochs.groupby("trial_id", sort=False):
        best = best_epoch_of(own.sort_values("epoch"), metric, mode)
        rows.append({"trial_id": trial_id, "epoch": int(best["epoch"]), "last_epoch": int(own["epoch"].max())})
    return pd.DataFrame(rows, columns=["trial_id", "epoch", "last_epoch"])


def _curves_plot(
    epochs: pd.DataFrame, order: dict[str, int], best_epochs: pd.DataFrame, metric: str, mode: str, selection: str
) -> CurvesPlot | None:
    curves = epochs.loc[epochs[metric].notna(), ["trial_id", "status", "epoch", metric]]
    if curves.empty:
        return None
    curves = curves.assign(_rank=curves["trial_id"].map(order)).sort_values(["_rank", "epoch"]).drop(columns="_rank")
    best = best_epochs.merge(curves, on=["trial_id", "epoch"])[["trial_id", "epoch", metric]]
    extreme = curves.loc[curves[metric].idxmin() if mode == "min" else curves[metric].idxmax()]
    name = label(metric)
    several = best_epochs[best_epochs["last_epoch"] > 1]
    early = int((several["epoch"] < several["last_epoch"]).sum())
    caption = (
        f"{name.capitalize()} per epoch for {plural(curves['trial_id'].nunique(), 'trial')}; "
        f"the {'lowest' if mode == 'min' else 'highest'}, {num(extreme[metric])}, "
        f"is trial {extreme['trial_id']} at epoch {int(extreme['epoch'])}; "
        f"◆ marks each trial's best epoch by {label(selection)}"
    )
    if len(several):
        caption += f", before its last epoch for {early} of {len(several)} trials with more than one"
    return CurvesPlot(
        title=f"{name} per epoch",
        metric=metric,
        curves=curves.reset_index(drop=True),
        best=best.reset_index(drop=True),
        caption=caption + ".",
    )


def _scatter_points(trials: pd.DataFrame, x: str, y: str) -> pd.DataFrame:
    both = trials[np.isfinite(trials[x]) & np.isfinite(trials[y])]
    return both.assign(eligible=both["status"].isin(FINISHED)).reset_index(drop=True)


def _paradox_plot(trials: pd.DataFrame, baseline: dict[str, Any]) -> ScatterPlot | None:
    """Eval perplexity vs win rate across trials, with Spearman's rho over the finished ones."""
    points = _scatter_points(trials, "eval_ppl", "win_rate")
    if points.empty:
        return None
    finished = points[points["eligible"]]
    corr = spearman(finished["eval_ppl"], finished["win_rate"])
    caption = sentence_case(_correlation_phrase(corr, "eval perplexity", "win rate", len(finished)))
    if np.isfinite(corr.rho):
        if corr.n >= 4 and np.isfinite(corr.low) and corr.high < 0:
            caption += ": lower perplexity went with a higher win rate"
        elif corr.n >= 4 and np.isfinite(corr.low) and corr.low > 0:
            caption += ": lower perplexity went with a lower win rate, the perplexity paradox"
        elif np.isfinite(corr.low):
            caption += ": perplexity does not reliably rank trials by win rate here"
    if len(finished):
        lowest = finished.loc[finished["eval_ppl"].idxmin()]
        top = finished.loc[finished["win_rate"].idxmax()]
        if lowest["trial_id"] != top["trial_id"]:
            caption += (
                f"; the lowest perplexity ({lowest['trial_id']}, {num(lowest['eval_ppl'])}) is not the highest "
                f"win rate ({top['trial_id']}, {num(top['win_rate'])})"
            )
    reference = {"y": 0.5} | ({"x": baseline["eval_ppl"]} if baseline.get("eval_ppl") is not None else {})
    return ScatterPlot(
        title="the perplexity paradox: eval perplexity vs win rate",
        x="eval_ppl",
        y="win_rate",
        points=points,
        correlation=corr,
        reference=reference,
        caption=caption + ".",
    )


def _retention_plot(trials: pd.DataFrame, baseline: dict[str, Any]) -> ScatterPlot | None:
    """Retention perplexity (the base model's own domain) vs win rate: what fine-tuning forgot for what it gained."""
    y = "win_rate" if trials["win_rate"].notna().any() else "eval_ppl"
    points = _scatter_points(trials, "retention_ppl", y)
    if points.empty:
        return None
    finished = points[points["eligible"]]
    corr = spearman(finished["retention_ppl"], finished[y])
    base = baseline.get("retention_ppl")
    if base is not None and len(finished):
        forgot = finished[finished["retention_ppl"] > base]
        caption = (
            f"{len(forgot)} of {len(finished)} finished trials forgot part of the base domain "
            f"(retention perplexity above the base model's {num(base)})"
        )
        if len(forgot):
            worst = forgot.loc[forgot["retention_ppl"].idxmax()]
            caption += (
                f", most {worst['trial_id']} at {num(worst['retention_ppl'])} "
                f"({(worst['retention_ppl'] / base - 1) * 100:+.0f}%)"
            )
    else:
        caption = (
            f"Retention perplexity from {num(points['retention_ppl'].min())} to "
            f"{num(points['retention_ppl'].max())} across {plural(len(points), 'trial')}"
        )
    caption += "; " + _correlation_phrase(corr, "retention perplexity", label(y), len(finished))
    reference = {"x": base} if base is not None else {}
    return ScatterPlot(
        title=f"what was forgotten: retention perplexity vs {label(y)}",
        x="retention_ppl",
        y=y,
        points=points,
        correlation=corr,
        reference=reference,
        caption=caption + ".",
    )


def _correlation_phrase(corr: Correlation, x: str, y: str, n: int) -> str:
    if not np.isfinite(corr.rho):
        return f"too few finished trials with distinct values ({n}) for a rank correlation of {x} and {y}"
    text = f"Spearman's ρ between {x} and {y} is {corr.rho:+.2f} over {plural(n, 'finished trial')}"
    if np.isfinite(corr.low):
        return text + f" (95% CI {corr.low:+.2f} to {corr.high:+.2f})"
    return text + (" (too few for an interval)" if n < 4 else " (no interval at |ρ| = 1)")


def _is_log(values: pd.Series) -> bool:
    numeric = pd.to_numeric(values, errors="coerce")
    return bool(numeric.notna().all() and (numeric > 0).all() and numeric.max() >= 10 * numeric.min())


def _effects_plot(trials: pd.DataFrame, params: list[str], metric: str) -> EffectsPlot:
    """The metric against each varying parameter, and its mean over finished trials per value (or quartile)."""
    points = trials[trials[metric].notna()]
    points = points.assign(eligible=points["status"].isin(FINISHED)).reset_index(drop=True)
    finished = points[points["eligible"]]
    rows = []
    for param in params:
        groups = levels(finished[param])
        numeric = None if _is_listy(finished[param]) else pd.to_numeric(finished[param], errors="coerce")
        if numeric is not None and numeric.isna().any():
            numeric = None
        own = [
            {
                "param": param,
                "level": level,
                "x": level if numeric is None else float(numeric[members.index].median()),
                "mean": members[metric].mean(),
                "n": len(members),
            }
            for level, members in finished.groupby(groups, sort=False)
        ]
        rows += own if numeric is None else sorted(own, key=lambda r: r["x"])
    means = pd.DataFrame(rows, columns=["param", "level", "x", "mean", "n"])

    spreads = []
    for param in params:
        own = means[means["param"] == param]
        if len(own) > 1:
            low, high = own.loc[own["mean"].idxmin()], own.loc[own["mean"].idxmax()]
            spreads.append((high["mean"] - low["mean"], param, low, high))
    spreads.sort(key=lambda s: -s[0])
    name = label(metric)
    if spreads:
        phrases = [
            f"{param}, from {num(low['mean'])} at {low['level']} to {num(high['mean'])} at {high['level']}"
            for _, param, low, high in spreads[:3]
        ]
        caption = f"The mean {name} of finished trials moves most with " + "; then ".join(phrases)
    else:
        caption = (
            f"{name.capitalize()} of {plural(len(points), 'trial')} by each parameter; "
            "no parameter has two values among finished trials"
        )
    return EffectsPlot(
        title=f"{name} by parameter",
        metric=metric,
        params=params,
        log_x=[p for p in params if not _is_listy(points[p]) and _is_log(points[p])],
        points=points,
        means=means,
        caption=caption + ".",
    )


def _parallel_plot(
    trials: pd.DataFrame, params: list[str], metric: str, cost: str, best: pd.Series | None
) -> ParallelPlot:
    axes = [*params, cost, *[m for m in ("eval_ppl", "win_rate") if trials[m].notna().any()]]
    lines = trials[trials[metric].notna()]
    lines = lines.assign(eligible=lines["status"].isin(FINISHED))[["trial_id", "status", "eligible", *axes]]
    caption = (
        f"One line per trial ({len(lines)} with {label(metric)}), coloured by {label(metric)} from "
        f"{num(lines[metric].min())} to {num(lines[metric].max())}"
    )
    if best is not None:
        caption += f"; the best, {best['trial_id']}, has {_config(best, params)}"
    return ParallelPlot(
        title="all parameters at once: parallel coordinates",
        axes=axes,
        log_axes=[a for a in axes if not _is_listy(lines[a]) and _is_log(lines[a])],
        colour=metric,
        lines=lines.reset_index(drop=True),
        caption=caption + ".",
    )


def _importance_plot(trials: pd.DataFrame, params: list[str], metric: str) -> ImportancePlot | None:
    """Each parameter's share of the metric's variance across finished trials (omega squared of a one-way ANOVA)."""
    finished = trials[trials["status"].isin(FINISHED) & trials[metric].notna()]
    if len(finished) < MIN_TRIALS_FOR_IMPORTANCE:
        return None
    rows = []
    for param in params:
        groups = levels(finished[param])
        rows.append({"param": param, "share": variance_explained(finished[metric], groups), "levels": groups.nunique()})
    importances = pd.DataFrame(rows).sort_values("share", ascending=False, na_position="last", kind="stable")
    phrases = [
        f"{r['param']} {r['share']:.0%}"
        if np.isfinite(r["share"])
        else f"{r['param']} not estimable (one trial per value)"
        for _, r in importances.iterrows()
    ]
    caption = (
        f"Share of the variance of {label(metric)} across {plural(len(finished), 'finished trial')} that each "
        f"parameter explains alone (ω² of a one-way ANOVA; 0% is no detectable effect): {', '.join(phrases)}."
    )
    return ImportancePlot(
        title=f"parameter importance for {label(metric)}",
        metric=metric,
        importances=importances.reset_index(drop=True),
        n=len(finished),
        caption=caption,
    )


def _judge_notes(epochs: pd.DataFrame, name: str) -> list[str]:
    """Which judge gave the win rates (peftsweep rejudge may have changed it), and the epochs it did not judge."""
    notes = []
    if "judge" in epochs and epochs["judge"].notna().any():
        notes.append(f"Win rates judged by {', '.join(sorted(epochs['judge'].dropna().unique()))}.")
    if "judge_error" in epochs and epochs["judge_error"].notna().any():
        unjudged = int(epochs["judge_error"].notna().sum())
        notes.append(
            f"{plural(unjudged, 'epoch')} not judged (the judge was unavailable), shown without a win rate; "
            f"peftsweep rejudge {name} --missing judges them."
        )
    return notes


def _samples(results: Results, best: pd.Series) -> Samples | None:
    """Up to SAMPLES_PER_VERDICT judged prompts of each verdict, for the best trial at its best epoch."""
    epoch = int(best["best_epoch"])
    answers = load_answers(results, best["trial_id"])
    answers = answers[answers["epoch"] == epoch]
    if answers.empty:
        return None
    rows = (
        answers.sort_values("prompt_id")
        .groupby("verdict", sort=False, dropna=False)
        .head(SAMPLES_PER_VERDICT)
        .sort_values(["verdict", "prompt_id"], ascending=[False, True])
    )
    counts = answers["verdict"].map(verdict_word).value_counts()
    tally = ", ".join(plural(int(counts[v]), v) for v in ("win", "tie", "loss") if v in counts)
    if NOT_JUDGED in counts:
        tally += f"{', ' if tally else ''}{counts[NOT_JUDGED]} {NOT_JUDGED}"
    caption = (
        f"{len(rows)} of {len(answers)} judged prompts for trial {best['trial_id']} at epoch {epoch}, "
        f"up to {SAMPLES_PER_VERDICT} per verdict; over all {len(answers)}: {tally}."
    )
    columns = ["prompt_id", "prompt", "reference", "base_answer", "answer", "verdict"]
    return Samples(trial_id=best["trial_id"], epoch=epoch, rows=rows[columns].reset_index(drop=True), caption=caption)


def _census(trials: pd.DataFrame) -> str:
    counts = trials["status"].value_counts()
    order = [s for s in STATUS_STYLE if s in counts] + [s for s in counts.index if s not in STATUS_STYLE]
    statuses = ", ".join(plural(counts[s], "error") if s == TrialStatus.ERROR else f"{counts[s]} {style(s)[0]}" for s in order)
    return f"{plural(len(trials), 'trial')}: {statuses}." if len(trials) else "No trials yet."


def _qualities(row: pd.Series, metric: str) -> str:
    """"win rate 0.62 (95% CI 0.31-0.86) at epoch 2, eval perplexity 4.1": the selection metric first."""
    parts = []
    for m in [metric] + [m for m in ("win_rate", "eval_ppl") if m != metric]:
        if pd.isna(row[m]):
            continue
        text = f"{label(m)} {num(row[m])}"
        if m == "win_rate" and pd.notna(row["win_rate_low"]):
            text += f" (95% CI {row['win_rate_low']:.2f}–{row['win_rate_high']:.2f})"
        if m == metric:
            text += f" at epoch {int(row['best_epoch'])}"
        parts.append(text)
    return ", ".join(parts)


def _config(row: pd.Series, params: list[str]) -> str:
    return ", ".join(f"{p} {cell(row[p])}" for p in params if not missing(row[p]))


def _amount(metric: str, value: float) -> str:
    """A cost's value alone: "41 s", "3.2 TFLOPs", "0.25 GPU-hours", "$1.2", "6.5 GB"."""
    return {
        "train_flops": flops, "train_seconds": duration, "gpu_hours": lambda v: f"{num(v)} GPU-hours",
        "cost_usd": lambda v: f"${num(v)}", "peak_memory_gb": lambda v: f"{num(v)} GB",
    }.get(metric, num)(value)  # fmt: skip


def _cost(metric: str, value: float) -> str:
    """A cost as words: "41 s of measured training time", "0.25 GPU-hours", "$1.2", "6.5 GB peak memory"."""
    if pd.isna(value):
        return f"unknown {label(metric)}"
    if metric not in ("train_flops", "train_seconds", "gpu_hours", "cost_usd", "peak_memory_gb"):
        return f"{label(metric)} {num(value)}"
    what = {"train_flops": " of training compute", "train_seconds": " of measured training time", "peak_memory_gb": " peak memory"}
    return _amount(metric, value) + what.get(metric, "")


def _saving(share: float) -> str:
    """A share of a cost: "35%", "2.5%", "99.7%" (never rounded to 0% or 100%)."""
    if share >= 0.995:
        return f"{min(share, 0.999):.1%}" if share < 1 else "100%"
    return f"{share:.0%}" if share >= 0.1 else f"{share * 100:.2g}%"


def _p(p: float) -> str:
    return "p < 0.001" if p < 0.001 else f"p = {p:.2g}"


def _absent(value: Any) -> bool:
    """No value: None, NaN, or pandas' NA (an integer parameter another method's trials lack)."""
    return value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value))


def _is_listy(values: pd.Series) -> bool:
    return any(isinstance(v, (list, tuple)) for v in values)
