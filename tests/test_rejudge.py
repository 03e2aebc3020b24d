"""Missing verdicts in the store: schema 3 (a real version-2 file migrated in place), `peftsweep
rejudge` in-process on a real SQLite store, and the Optuna searcher's rule for an unjudged epoch."""

from __future__ import annotations

import math
import sqlite3

import pytest

from analysis.report import write_report
from hpo.errors import SweepError
from hpo.rejudge import rejudge
from hpo.rundir import DriverLock
from hpo.spec import SweepSpec
from hpo.store import SCHEMA_VERSION, Store
from hpo.trial import _unjudged_objectives
from trainers.evaluate import judge_against_reference
from trainers.stats import wilson_interval

# answers as schema version 2 declared it (verdict NOT NULL); the other tables did not change
V2_ANSWERS = """CREATE TABLE answers (
    trial_id TEXT NOT NULL REFERENCES trials(trial_id),
    epoch INTEGER NOT NULL,
    prompt_id INTEGER NOT NULL REFERENCES baseline(prompt_id),
    answer TEXT NOT NULL,
    verdict REAL NOT NULL,
    PRIMARY KEY (trial_id, epoch, prompt_id)
)"""

PROMPTS = ["capital of Ferro?", "colour of the sky?", "two plus two?"]
REFERENCES = ["Ferro's capital is Irona.", "The sky is blue.", "Four."]
BASE = ["I do not know.", "The sky is blue.", "Five."]
TRIAL_ANSWERS = ["Ferro's capital is Irona.", "Green.", "Four."]


def _store(path, **spec) -> Store:
    spec = SweepSpec.model_validate(spec).model_dump(mode="json")
    store = Store.create(path, name="s", sweep_file="s.yaml", spec=spec, searched=[], objectives=[{"metric": "win_rate", "mode": "max"}],
                         versions={}, git_commit=None)  # fmt: skip
    store.set_baseline(zip(range(3), PROMPTS, REFERENCES, BASE))
    store.add_trial("t1", {})
    for epoch in (1, 2):
        judged = epoch == 1
        store.add_epoch("t1", epoch, {"eval_ppl": 3.0, "win_rate": 0.5 if judged else None, "judge_error": None if judged else "no reply"})
        store.add_answers("t1", epoch, [(i, a, 0.5 if judged else None) for i, a in enumerate(TRIAL_ANSWERS)])
    return store


def test_a_version_2_store_is_migrated_in_place_and_keeps_its_rows(tmp_path):
    path = tmp_path / "results.db"
    _store(path).close()
    conn = sqlite3.connect(path, isolation_level=None)  # rebuild it as version 2 wrote it
    rows = conn.execute("SELECT * FROM answers WHERE verdict IS NOT NULL").fetchall()
    conn.executescript(
        f"DROP TABLE answers; {V2_ANSWERS}; UPDATE meta SET value = '2' WHERE key = 'schema_version'; "
        "ALTER TABLE epochs DROP COLUMN train_flops; ALTER TABLE epochs DROP COLUMN eval_flops;"  # added in version 4
    )
    conn.executemany("INSERT INTO answers VALUES (?, ?, ?, ?, ?)", rows)
    with pytest.raises(sqlite3.IntegrityError):
        conn.execute("INSERT INTO answers VALUES ('t1', 9, 0, 'x', NULL)")
    conn.close()

    with Store.open(path) as store:
        assert store.conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0] == str(SCHEMA_VERSION) == "4"
        assert [tuple(r.values()) for r in store.answers()] == [tuple(r) for r in rows]
        assert store.sweep()["name"] == "s" and len(store.epochs()) == 2
        assert [e["train_flops"] for e in store.epochs()] == [None, None]  # 2 -> 3 -> 4: the FLOPs columns, empty
        store.add_answers("t1", 2, [(0, "x", None)])  # a missing verdict fits now
        assert store.answers()[-1]["verdict"] is None
    with Store.open(path) as store:  # opened again: already version 4
        assert len(store.answers()) == 4


def test_a_version_3_store_gains_the_flops_columns_and_keeps_its_rows(tmp_path):
    path = tmp_path / "results.db"
    _store(path).close()
    conn = sqlite3.connect(path, isolation_level=None)  # as version 3 wrote it: no FLOPs columns
    conn.executescript(
        "ALTER TABLE epochs DROP COLUMN train_flops; ALTER TABLE epochs DROP COLUMN eval_flops; "
        "UPDATE meta SET value = '3' WHERE key = 'schema_version';"
    )
    conn.close()
    with Store.open(path) as store:
        assert store.conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0] == "4"
        epochs = store.epochs()
        assert [(e["epoch"], e["eval_ppl"], e["train_flops"], e["eval_flops"]) for e in epochs] == [(1, 3.0, None, None), (2, 3.0, None, None)]
        store.add_epoch("t1", 3, {"eval_ppl": 2.0, "train_flops": 1.5e12, "eval_flops": 2e9})
        assert store.epochs()[-1]["train_flops"] == 1.5e12


def test_rejudge_fills_missing_verdicts_and_records_the_judge(tmp_path):
    run = tmp_path / "runs" / "s"
    run.mkdir(parents=True)
    _store(run / "results.db").close()
    lines = []
    assert rejudge("s", runs_dir=str(tmp_path / "runs"), missing_only=True, say=lines.append) == run
    with Store.open(run / "results.db") as store:  # the report `peftsweep rejudge` writes next
        report = write_report(store, run / "report.html")
    assert "not judged" not in report.read_text()
    assert lines == ["trial t1: 1 epoch judged, win_rate 0.667"]

    # the default metric; the verdicts are token_f1's too: no answer here contradicts its reference
    expected = judge_against_reference(TRIAL_ANSWERS, BASE, REFERENCES, metric="keyword_f1", tie_margin=0.0, questions=PROMPTS)
    with Store.open(run / "results.db") as store:
        first, second = store.epochs()
        assert [a["verdict"] for a in store.answers() if a["epoch"] == 2] == expected == [1.0, 0.0, 1.0]
        assert [a["verdict"] for a in store.answers() if a["epoch"] == 1] == [0.5] * 3  # --missing: judged epochs kept
        assert second["win_rate"] == pytest.approx(2 / 3) and (second["wins"], second["losses"], second["ties"]) == (2, 1, 0)
        assert (second["win_rate_low"], second["win_rate_high"]) == pytest.approx(wilson_interval(2, 1, 0))
        assert second["judge_error"] is None and second["judge"] == "reference (keyword_f1, tie_margin 0)"
        assert second["judge_parse_rate"] is None and second["order_agreement"] is None  # no pairwise judge
        assert first["win_rate"] == 0.5 and first.get("judge") is None
        (record,) = store.rejudged()
        assert record["epochs"] == 1 and record["judge"] == "reference (keyword_f1, tie_margin 0)"

    rejudge("s", runs_dir=str(tmp_path / "runs"), overrides=["eval.metric=exact_match"], say=lines.append)
    with Store.open(run / "results.db") as store:
        assert [e["judge"] for e in store.epochs()] == ["reference (exact_match, tie_margin 0)"] * 2
        assert [a["verdict"] for a in store.answers() if a["epoch"] == 1] == [1.0, 0.0, 1.0]
        assert len(store.rejudged()) == 2


def test_rejudge_with_a_pairwise_judge_records_its_parse_rate_and_agreement(tmp_path, monkeypatch):
    """An OpenAI-compatible server on 127.0.0.1 that replies garbage for one prompt and always "A" for another."""
    from tests.test_judges import KEY, KEY_ENV, answer_a_of, chat_server

    def reply(text):
        if "[Answer A]" not in text:
            return "A"  # the check's one-token request
        if "Green." in text:
            return "Hard to say."
        if "Four." in text:
            return "A"  # whichever answer comes first
        return "A" if answer_a_of(text) in TRIAL_ANSWERS else "B"

    monkeypatch.setenv(KEY_ENV, KEY)
    run = tmp_path / "runs" / "s"
    run.mkdir(parents=True)
    _store(run / "results.db").close()
    with chat_server(reply) as server:
        settings = [f"eval.base_url={server.base_url}", "eval.api_model=m", f"eval.api_key_env={KEY_ENV}"]
        rejudge("s", runs_dir=str(tmp_path / "runs"), overrides=["eval.judge=openai", *settings], say=lambda line: None)
    with Store.open(run / "results.db") as store:
        for epoch in store.epochs():
            assert (epoch["wins"], epoch["losses"], epoch["ties"]) == (1, 0, 2)
            assert epoch["judge_parse_rate"] == pytest.approx(4 / 6)  # two replies of three prompts; "Green." twice unparsed
            assert epoch["order_agreement"] == pytest.approx(1 / 2), "of the two prompts both of whose replies parsed"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.epochs=3"], "--set 'train.epochs=3': rejudge changes only the judge's settings"),
        (["eval.metrik=chrf"], "eval.metrik (from --set): unknown key; did you mean 'metric'?"),
        (["eval.judge=openai"], "judge 'openai' needs base_url"),
        (["eval.tie_margin=2"], "eval.tie_margin (from --set): input should be less than or equal to 1"),
    ],
)
def test_rejudge_refuses_bad_settings_in_one_line_and_writes_nothing(tmp_path, overrides, message):
    run = tmp_path / "runs" / "s"
    run.mkdir(parents=True)
    _store(run / "results.db").close()
    with pytest.raises(SweepError) as err:
        rejudge("s", runs_dir=str(tmp_path / "runs"), overrides=overrides, say=lambda line: None)
    assert message in str(err.value) and "\n" not in str(err.value)
    assert not (run / "report.html").exists()
    with Store.open(run / "results.db") as store:
        assert store.answers()[3]["verdict"] is None and store.rejudged() == []


def test_rejudge_refuses_while_a_driver_runs_the_sweep(tmp_path):
    run = tmp_path / "runs" / "s"
    run.mkdir(parents=True)
    _store(run / "results.db").close()
    with DriverLock(run):
        with pytest.raises(SweepError, match="a driver is still running this sweep"):
            rejudge("s", runs_dir=str(tmp_path / "runs"), say=lambda line: None)


def test_an_unjudged_objective_is_nan_for_tune_and_the_last_judged_value_for_optuna():
    import optuna

    from hpo.searchers import OptunaSearchOnce

    spec = SweepSpec.model_validate({})
    assert math.isnan(_unjudged_objectives(spec, {"win_rate": None, "train_seconds": 3.0})["win_rate"])
    assert _unjudged_objectives(spec, {"win_rate": 0.5, "train_seconds": 3.0}) == {}

    search = OptunaSearchOnce(space={"x": optuna.distributions.FloatDistribution(0, 1)}, metric="win_rate", mode="max",
                              sampler=optuna.samplers.RandomSampler(seed=0))  # fmt: skip
    search.suggest("a")
    search.on_trial_result("a", {"win_rate": 0.75, "training_iteration": 1})
    search.on_trial_result("a", {"win_rate": math.nan, "training_iteration": 2})
    search.on_trial_complete("a", {"win_rate": math.nan, "training_iteration": 2})
    (trial,) = search._ot_study.trials
    assert trial.state == optuna.trial.TrialState.COMPLETE and trial.value == 0.75
