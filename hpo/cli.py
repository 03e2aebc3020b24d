"""`peftsweep`: run sweeps, rebuild reports, export results."""

from __future__ import annotations

import importlib
import re
import sys
import threading
from pathlib import Path
from typing import Annotated, Optional

import typer
from typer.core import TyperArgument, TyperCommand

from hpo.errors import NOT_STARTED, SweepError, SweepFailed, SweepInterrupted
from trainers.vocabulary import SweepStatus


class _Command(TyperCommand):
    """Help as git, pip and pytest write theirs: `peftsweep run [OPTIONS] SWEEP`, each value named by
    what it is (SWEEP, NAME, KEY=VALUE, DIR), a flag bare.

    Without Rich (rich_markup_mode=None) typer writes options as click does, by their metavar; this
    writes arguments the same way, where typer would write `{sweep}` in the usage and `SWEEP <str>`.
    """

    def collect_usage_pieces(self, ctx: typer.Context) -> list[str]:
        return [re.sub(r"^\{(.*)\}", r"\1", piece) for piece in super().collect_usage_pieces(ctx)]

    def format_options(self, ctx: typer.Context, formatter) -> None:
        params = self.get_params(ctx)
        arguments = [
            ((p.metavar or p.name.upper()) + ("..." if p.nargs != 1 else ""), p.help or "") for p in params if isinstance(p, TyperArgument)
        ]
        options = [record for p in params if not isinstance(p, TyperArgument) and (record := p.get_help_record(ctx))]
        for title, rows in (("Arguments", arguments), ("Options", options)):
            if rows:
                with formatter.section(title):
                    formatter.write_dl(rows)


app = typer.Typer(
    help="Hyperparameter sweeps for parameter-efficient fine-tuning, on Ray Tune and Optuna.\n\n"
    "A sweep file (sweeps/NAME.yaml) declares the model, data and search space; `run` trains every trial, "
    "records it in runs/NAME/results.db and writes runs/NAME/report.html.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain help, as click (and git, pip, pytest) write it; Rich boxes show every flag as <bool>
    context_settings={"help_option_names": ["-h", "--help"]},
)

RunsDir = Annotated[
    Optional[str], typer.Option("--runs-dir", metavar="DIR", help="folder holding the runs (default: $PEFTSWEEP_RUNS or ./runs)")
]
Address = Annotated[
    Optional[str],
    typer.Option(
        "--address", metavar="HOST:PORT", envvar="RAY_ADDRESS", help="Ray cluster to attach to, or auto (default: start Ray locally)"
    ),
]


def _fail(message: str) -> None:
    typer.echo(f"peftsweep: error: {message}", err=True)
    raise typer.Exit(2)


def _stopped(exc: SweepInterrupted | SweepFailed, name: str) -> None:
    """The last line of a sweep that did not complete, and its exit code: 128 + the signal's number
    for an interrupted sweep (130 for Ctrl-C), 1 for a failed one."""
    if isinstance(exc, SweepInterrupted):
        if exc.resumable:
            said = f"finished epochs are in the store, and `peftsweep resume {name}` continues the sweep"
        else:
            said = f"it {NOT_STARTED}"
        typer.echo(f"peftsweep: interrupted ({exc}); {said}", err=True)
        raise typer.Exit(128 + exc.signum)
    typer.echo(f"peftsweep: failed: {exc}", err=True)
    raise typer.Exit(1)


def _say_packing(spec, err: bool = False) -> None:
    from hpo.space import packing_plan

    plan = packing_plan(spec)
    if plan:
        typer.echo(f"  {plan}", err=err)


def _grid_size(spec) -> str:
    if spec.search.algorithm == "grid":
        trainings = spec.num_trainings
        if spec.folded_epochs:
            results = trainings * len(spec.folded_epochs)
            return f"{trainings} trials (grid, epochs folded: {results} results)"
        if "epochs" in spec.search.space and spec.search.fold_epochs and spec.decaying_schedule:
            return (
                f"{trainings} trials (grid; epochs not folded: a decaying lr_schedule depends on the total epochs, "
                "so each epochs value trains on its own)"
            )
        return f"{trainings} trials (grid)"
    return f"{spec.search.num_samples} trials ({spec.search.algorithm})"


@app.command(cls=_Command, short_help="Run a sweep and write its report.")
def run(
    sweep: Annotated[str, typer.Argument(metavar="SWEEP", help="sweep name (sweeps/SWEEP.yaml) or path to a sweep file")],
    name: Annotated[Optional[str], typer.Option("--name", metavar="NAME", help="run name (default: the sweep's name)")] = None,
    set_: Annotated[
        list[str], typer.Option("--set", metavar="KEY=VALUE", help="override a value: --set train.epochs=2 (repeatable)")
    ] = [],
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace an existing run of the same name")] = False,
    address: Address = None,
    runs_dir: RunsDir = None,
) -> None:
    """Run a sweep: every trial through Ray Tune, results to the store, then the report."""
    from hpo.checks import check_inputs, check_run_name
    from hpo.spec import load_sweep

    run_name = name
    try:
        if name is not None:
            check_run_name(name, from_option=True)
        loaded = load_sweep(sweep, set_)
        if name is None:
            run_name = loaded.name
            check_run_name(run_name, from_option=False)
        check_inputs(loaded.spec, runs_dir)  # before the first line of output: bad input gets one line, the error
        typer.echo(f"Sweep {loaded.path}: {_grid_size(loaded.spec)}, scheduler {loaded.spec.scheduler.name}", err=True)
        _say_packing(loaded.spec, err=True)
        from hpo.driver import run_sweep

        _import_meanwhile("analysis.report")
        outcome = run_sweep(
            loaded, name=run_name, runs_dir=runs_dir, overwrite=overwrite, address=address, overrides=set_, checked=True
        )
        _report(outcome)
    except SweepError as exc:
        _fail(str(exc))
    except (SweepInterrupted, SweepFailed) as exc:
        _stopped(exc, run_name)
    except KeyboardInterrupt:  # before the sweep started: nothing to resume
        typer.echo("peftsweep: interrupted before the sweep started; nothing was run", err=True)
        raise typer.Exit(130)
    typer.echo(str(outcome.run_dir / "report.html"))


def _import_meanwhile(module: str) -> None:
    """Import `module` in a thread of its own: the report's modules (plotly) load while the sweep's
    driver waits for Ray to start, instead of after the last trial. An import that fails here fails
    again, with its one line, where the module is used."""

    def load() -> None:
        try:
            importlib.import_module(module)
        except Exception:
            pass

    threading.Thread(target=load, name=f"peftsweep-import-{module}", daemon=True).start()


def _report(outcome) -> None:
    """Write the report of a sweep that ran to its end; a failed sweep (no trial finished) is SweepFailed after it."""
    try:
        path = _write_report(outcome.run_dir)
    except KeyboardInterrupt:  # the sweep is recorded; only its report is missing
        name = outcome.run_dir.name
        typer.echo(f"peftsweep: interrupted while writing the report; the sweep is in the store: `peftsweep report {name}` writes it", err=True)
        raise typer.Exit(130) from None
    typer.echo(f"Report: {path}", err=True)
    if outcome.status == SweepStatus.FAILED:
        name = outcome.run_dir.name
        raise SweepFailed(f"sweep {name} failed: {outcome.note} (peftsweep export {name} has each trial's error; report: {path})")


def _write_report(run_dir: Path) -> Path:
    """runs/NAME/report.html from the store; a report that cannot be written is SweepFailed (the store keeps the results)."""
    from analysis.report import write_report
    from hpo.store import Store

    store = Store.open(run_dir / "results.db")
    try:
        return write_report(store, run_dir / "report.html")
    except OSError as exc:
        raise SweepFailed(
            f"cannot write the report {run_dir / 'report.html'}: {exc.strerror}; the results are in the store: "
            f"free space, then `peftsweep report {run_dir.name}`"
        ) from None
    finally:
        store.close()


@app.command(cls=_Command, short_help="Continue a sweep that was interrupted or whose driver died.")
def resume(
    name: Annotated[str, typer.Argument(metavar="NAME", help="run name (runs/NAME)")],
    address: Address = None,
    runs_dir: RunsDir = None,
) -> None:
    """Continue a sweep whose driver stopped (killed, interrupted, a lost head node): finished
    trials are kept and not run again, unfinished ones restart from their last finished epoch."""
    try:
        _open_store(name, runs_dir).close()  # a clear error for an unknown run
        from hpo.driver import resume_sweep

        _import_meanwhile("analysis.report")
        outcome = resume_sweep(name, runs_dir=runs_dir, address=address)
        _report(outcome)
    except SweepError as exc:
        _fail(str(exc))
    except (SweepInterrupted, SweepFailed) as exc:
        _stopped(exc, name)
    typer.echo(str(outcome.run_dir / "report.html"))


def _open_store(name: str, runs_dir: str | None):
    from hpo.rundir import runs_root
    from hpo.store import Store

    root = runs_root(runs_dir)
    path = root / name / "results.db"
    if not path.exists():  # a folder in its place is Store.open's to explain
        known = sorted(p.parent.name for p in root.glob("*/results.db"))
        raise SweepError(f"no run '{name}' in {root}/ (runs: {', '.join(known) or 'none'}); run it first: peftsweep run SWEEP")
    return Store.open(path)


@app.command(cls=_Command, short_help="Rebuild runs/NAME/report.html from the store.")
def report(name: Annotated[str, typer.Argument(metavar="NAME", help="run name (runs/NAME)")], runs_dir: RunsDir = None) -> None:
    """Rebuild runs/NAME/report.html from the store (also while the sweep is running)."""
    from analysis.report import write_report

    try:
        with _open_store(name, runs_dir) as store:
            path = write_report(store, store.path.parent / "report.html")
    except SweepError as exc:
        _fail(str(exc))
    except OSError as exc:  # a full disk, a read-only run folder: the store is untouched
        typer.echo(f"peftsweep: error: cannot write {exc.filename or 'the report'}: {exc.strerror}; free space or fix the folder's permissions, then run this again", err=True)
        raise typer.Exit(1)
    typer.echo(str(path))


@app.command(cls=_Command, short_help="Judge the stored answers again, without training.")
def rejudge(
    name: Annotated[str, typer.Argument(metavar="NAME", help="run name (runs/NAME)")],
    set_: Annotated[
        list[str],
        typer.Option("--set", metavar="KEY=VALUE", help="another judge or its settings: --set eval.judge=openai (repeatable)"),
    ] = [],
    missing: Annotated[bool, typer.Option("--missing", help="judge only epochs whose verdicts are missing")] = False,
    runs_dir: RunsDir = None,
) -> None:
    """Judge the stored answers again, without training (the sweep's eval settings, or --set eval....), then rebuild the report."""
    try:
        _open_store(name, runs_dir).close()  # a clear error for an unknown run
        from hpo.rejudge import rejudge as rejudge_run

        run_dir = rejudge_run(name, runs_dir=runs_dir, overrides=set_, missing_only=missing, say=lambda line: typer.echo(line, err=True))
        path = _write_report(run_dir)
    except SweepError as exc:
        _fail(str(exc))
    except SweepFailed as exc:
        _stopped(exc, name)
    typer.echo(str(path))


@app.command(cls=_Command, short_help="Write one row per trial, as CSV or JSON.")
def export(
    name: Annotated[str, typer.Argument(metavar="NAME", help="run name (runs/NAME)")],
    format: Annotated[str, typer.Option("--format", "-f", metavar="FORMAT", help="csv or json")] = "csv",
    output: Annotated[
        Optional[Path], typer.Option("--output", "-o", metavar="PATH", help="file to write (default: standard output)")
    ] = None,
    runs_dir: RunsDir = None,
) -> None:
    """One row per trial, by trial id: status, searched parameters, best-epoch metrics, cost, and the report's recommendation."""
    from analysis.load import load_results
    from analysis.report_data import by_trial, report_data, with_recommendation

    try:
        if format not in ("csv", "json"):
            raise SweepError(f"--format '{format}': use csv or json")
        with _open_store(name, runs_dir) as store:
            results = load_results(store)
        # The report's own data step decides the recommendation, so export and report never disagree.
        data = report_data(results)
        table = by_trial(with_recommendation(data.trials, data.sweet_spot))
    except SweepError as exc:
        _fail(str(exc))
    text = table.to_csv(index=False) if format == "csv" else table.to_json(orient="records", indent=2) + "\n"
    if output is None:
        sys.stdout.write(text)
        return
    tmp = output.with_name(output.name + ".tmp")
    try:
        tmp.write_text(text)
        tmp.replace(output)
    except OSError as exc:
        _fail(f"cannot write {output}: {exc.strerror}")
    typer.echo(f"{len(table)} trials -> {output}", err=True)


@app.command(cls=_Command, short_help="Show the best trial and the sweet spot, with their adapters.")
def best(
    name: Annotated[str, typer.Argument(metavar="NAME", help="run name (runs/NAME)")],
    runs_dir: RunsDir = None,
) -> None:
    """The best trial and the report's sweet spot: their parameters, metrics at their best epoch, and where their adapters are."""
    from analysis.load import load_results
    from analysis.report_data import report_data

    try:
        with _open_store(name, runs_dir) as store:
            results = load_results(store)
        data = report_data(results)  # the report's ranking and sweet spot
        if data.best_trial is None:
            raise SweepError(f"run '{name}' has no finished trial yet (peftsweep export {name} shows each trial's status)")
    except SweepError as exc:
        _fail(str(exc))
    trials, names, spot = data.trials.set_index("trial_id", drop=False), data.names, data.sweet_spot
    top = trials.loc[data.best_trial]
    lines = _trial_lines(f"best trial {top['trial_id']} ({top['status']}) by {data.metric}", top, names, results)
    if spot.cheapest is not None and spot.cheapest != spot.best:
        cheap = trials.loc[spot.cheapest]
        lines += _trial_lines(f"sweet spot trial {cheap['trial_id']} ({cheap['status']})", cheap, names, results)
    lines += [f"  {sentence}" for sentence in spot.why]  # the report's words for its choice
    typer.echo("\n".join(lines))


def _trial_lines(heading: str, row, names, results) -> list[str]:
    """A trial as `best` prints it: `heading`, its name, parameters, metrics at its best epoch, and its adapter."""
    from analysis.load import training_id

    epoch = int(row["best_epoch"])
    checkpoint = next(
        (e["checkpoint"] for e in results.epochs if e["trial_id"] == training_id(row["trial_id"]) and e["epoch"] == epoch),
        None,
    )
    adapter = Path(checkpoint) / "adapter" if checkpoint else None
    params = " ".join(f"{p}={row[p]}" for p in results.sweep["searched"] if p in row and str(row[p]) != "nan")
    lines = [
        f"{heading}, at epoch {epoch} of {int(row['epochs_completed'])}",
        f"  name in the report: {names[row['trial_id']]}",
        f"  parameters: {params or '(none searched)'}",
        f"  win_rate {row['win_rate']:.3f} [{row['win_rate_low']:.3f}, {row['win_rate_high']:.3f}]"
        f"  eval_ppl {row['eval_ppl']:.3f}  train_seconds {row['train_seconds']:.1f}  gpu_hours {row['gpu_hours']:.4f}",
    ]
    if adapter is not None and (adapter / "adapter_config.json").is_file():
        lines.append(f"  adapter: {adapter}  (peft.PeftModel.from_pretrained(base_model, that path))")
    elif adapter is not None and adapter.is_dir():
        lines.append(f"  model: {adapter}  (fully fine-tuned: AutoModelForCausalLM.from_pretrained(that path))")
    else:
        lines.append("  adapter: not kept (the method trains no adapter, or its checkpoint was removed)")
    return lines


@app.command(cls=_Command, short_help="Make every check run makes, without running.")
def validate(
    sweeps: Annotated[list[str], typer.Argument(metavar="SWEEP", help="sweep names (sweeps/SWEEP.yaml) or paths to sweep files")],
    set_: Annotated[
        list[str],
        typer.Option(
            "--set", metavar="KEY=VALUE", help="override a value in each sweep, as run does: --set train.epochs=2 (repeatable)"
        ),
    ] = [],
    runs_dir: RunsDir = None,
) -> None:
    """Check sweep files without running them: every check `run` makes before Ray starts (data, model, prompt lengths, teacher, judge, storage)."""
    from hpo.checks import check_inputs
    from hpo.spec import load_sweep

    failed = 0
    for ref in sweeps:
        try:
            loaded = load_sweep(ref, set_)
            check_inputs(loaded.spec, runs_dir)
        except SweepError as exc:
            typer.echo(f"peftsweep: error: {exc}", err=True)
            failed += 1
            continue
        typer.echo(f"ok {loaded.path}: {_grid_size(loaded.spec)}")
        _say_packing(loaded.spec)
    if failed:
        raise typer.Exit(2)


@app.command("ls", cls=_Command, short_help="List the sweep files and the runs.")
def ls(runs_dir: RunsDir = None) -> None:
    """List the sweep files and the runs."""
    from hpo.rundir import runs_root
    from hpo.spec import available_sweeps, load_sweep, sweeps_dir

    typer.echo(f"Sweeps in {sweeps_dir()}/:")
    for ref in available_sweeps():
        try:
            loaded = load_sweep(ref)
            typer.echo(f"  {ref:<20} {_grid_size(loaded.spec):<24} {loaded.spec.description}")
        except SweepError as exc:
            typer.echo(f"  {ref:<20} invalid: {exc}")
    root = runs_root(runs_dir)
    typer.echo(f"Runs in {root}/:")
    from hpo.store import Store

    for db in sorted(root.glob("*/results.db")):
        try:
            with Store.open(db) as store:  # checks the store is whole: a damaged one is named, the others listed
                status, trials = store.sweep()["status"], len(store.trials())
        except SweepError as exc:
            typer.echo(f"  {db.parent.name:<20} {'unreadable':<12} {exc}")
            continue
        typer.echo(f"  {db.parent.name:<20} {status:<12} {trials} trials")


if __name__ == "__main__":
    app(prog_name="peftsweep")  # `python -m hpo.cli` helps and errs as the installed command does
