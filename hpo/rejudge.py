"""`peftsweep rejudge`: judge a sweep's stored answers again, without training.

Fills the verdicts an unavailable judge left missing, or judges every epoch with another judge
(`--set eval.judge=...`). Each epoch's verdicts and the metrics they give are replaced in one
transaction, so a judge that fails midway leaves every epoch either judged anew or as it was.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

from pydantic import ValidationError

from hpo.rundir import DriverLock, runs_root
from hpo.errors import SweepError
from hpo.spec import apply_override, describe_error
from hpo.store import Store
from tracking.hooks import finish_tracking
from trainers.config import EvalConfig, _Strict
from trainers.evaluate import win_rate
from trainers.judges import JudgeError, agreement_rate, judge_label, make_judge, parse_rate


class _Overridden(_Strict):
    eval: EvalConfig


def eval_settings(stored: dict[str, Any], overrides: list[str], where: Path) -> EvalConfig:
    """The sweep's stored `eval` section with `--set eval.KEY=VALUE` overrides, validated."""
    raw: dict[str, Any] = {"eval": dict(stored)}
    keys = set()
    for item in overrides:
        if not item.partition("=")[0].strip().startswith("eval."):
            raise SweepError(f"--set '{item}': rejudge changes only the judge's settings: use --set eval.KEY=VALUE")
        keys.add(apply_override(raw, item))
    try:
        return _Overridden.model_validate(raw).eval
    except ValidationError as exc:
        raise SweepError(describe_error(exc.errors()[0], where, keys, _Overridden)) from None


def rejudge(
    name: str,
    *,
    runs_dir: str | None = None,
    overrides: list[str] = (),
    missing_only: bool = False,
    say: Callable[[str], None] = print,
) -> Path:
    """Judge the stored answers of run NAME again (only epochs with missing verdicts if `missing_only`); returns its run folder."""
    run_dir = runs_root(runs_dir) / name
    with DriverLock(run_dir):  # no driver may write the store meanwhile
        store = Store.open(run_dir / "results.db")
        try:
            settings = eval_settings(store.sweep()["spec"]["eval"], list(overrides), store.path)
            judge = make_judge(settings)
            label = judge_label(settings)
            try:
                judge.check()
            except JudgeError as exc:
                raise SweepError(str(exc)) from None
            baseline = store.baseline()
            prompts = [row["prompt"] for row in baseline]
            references = [row["reference"] for row in baseline]
            base_answers = [row["answer"] for row in baseline]
            by_epoch: dict[tuple[str, int], list[dict[str, Any]]] = {}
            for row in store.answers():
                by_epoch.setdefault((row["trial_id"], row["epoch"]), []).append(row)
            judged_epochs = 0
            for trial in store.trials():
                epochs = sorted(e for t, e in by_epoch if t == trial["trial_id"])
                if missing_only:
                    epochs = [e for e in epochs if any(r["verdict"] is None for r in by_epoch[trial["trial_id"], e])]
                rates = []
                for epoch in epochs:
                    rows = by_epoch[trial["trial_id"], epoch]
                    answers = [r["answer"] for r in rows]  # in prompt_id order, as the baseline
                    try:
                        verdicts = judge.judge(prompts, answers, base_answers, references)
                    except JudgeError as exc:
                        raise SweepError(
                            f"trial {trial['trial_id']} epoch {epoch}: {exc} (epochs judged so far are kept; "
                            f"peftsweep rejudge {name} --missing continues)"
                        ) from None
                    scores = [v.score for v in verdicts]
                    metrics = {
                        **win_rate(scores),
                        "order_agreement": agreement_rate(verdicts),
                        "judge_parse_rate": parse_rate(verdicts),
                        "judge_error": None,
                        "judge": label,
                    }
                    store.set_verdicts(trial["trial_id"], epoch, scores, metrics)
                    rates.append(f"{metrics['win_rate']:.3f}")
                    judged_epochs += 1
                done = f"{len(epochs)} epoch{'s' if len(epochs) != 1 else ''} judged"
                say(f"trial {trial['trial_id']}: {done}" + (f", win_rate {' '.join(rates)}" if rates else ""))
            store.add_rejudge({"at": time.time(), "judge": label, "eval": settings.model_dump(mode="json"), "epochs": judged_epochs})
            finish_tracking(store, say)  # new win rates: optuna.db rebuilt, MLflow's histories replaced
            return run_dir
        finally:
            store.close()
