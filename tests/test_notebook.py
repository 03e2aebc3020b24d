"""analysis/notebooks/frontiers.ipynb runs top to bottom in a real Jupyter kernel against a hand-made store."""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbclient import NotebookClient

from test_report import make_store  # pytest puts tests/ (no __init__.py) on sys.path

NOTEBOOK = Path(__file__).resolve().parents[1] / "analysis" / "notebooks" / "frontiers.ipynb"


def _text(cell) -> str:
    """What a code cell showed: its printed text and the plain-text form of its result."""
    parts = []
    for output in cell.get("outputs", []):
        parts.append(output.get("text", ""))
        parts.append(output.get("data", {}).get("text/plain", ""))
    return "".join(parts)


def test_notebook_reproduces_frontier_paradox_and_table(tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    (runs / "demo").mkdir(parents=True)
    make_store(runs / "demo" / "results.db").close()
    # The notebook reads the sweep's name and runs folder from the environment its kernel inherits.
    monkeypatch.setenv("PEFTSWEEP_SWEEP", "demo")
    monkeypatch.setenv("PEFTSWEEP_RUNS", str(runs))

    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert all(not cell.get("outputs") for cell in nb.cells if cell.cell_type == "code"), "commit it without outputs"
    # jupyter_client starts the "python3" kernel with this interpreter (sys.executable), so the venv's packages.
    client = NotebookClient(
        nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK.parent)}}
    )
    client.execute()  # raises CellExecutionError, with the traceback, if any cell fails

    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    shown = [_text(cell) for cell in code]
    assert "Sweet spot: trial t-cheap" in shown[1] and "7 trials: 3 completed" in shown[1]
    # The frontier: the report's caption, its two trials, and a plotly figure.
    assert "2 of 4 finished trials are on the frontier" in shown[2]
    assert "t-cheap" in shown[2] and "t-good" in shown[2] and "t-bad" not in shown[2]
    assert "application/vnd.plotly.v1+json" in code[3]["outputs"][0]["data"]
    # Three objectives: t-mid, dominated on time and win rate, joins the front by needing less memory than t-good.
    assert all(t in shown[4] for t in ("t-good", "t-mid", "t-cheap")) and "t-bad" not in shown[4]
    # The paradox panel: Spearman's rho with its interval, and its figure.
    assert "Spearman's ρ between eval perplexity and win rate is -0.80" in shown[5]
    assert "application/vnd.plotly.v1+json" in code[6]["outputs"][0]["data"]
    # The table: every trial, the failed ones included.
    for trial_id in ("t-good", "t-mid", "t-cheap", "t-bad", "t-late", "t-oom", "t-crash"):
        assert trial_id in shown[7], trial_id
