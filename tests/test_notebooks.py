"""The notebooks run top to bottom in a fresh kernel, with small parameters.

Each notebook is copied into a temporary directory, its "parameters" cell is replaced by small
values (the same names, checked), and nbclient executes it; any cell error fails the test. The
kernel is the interpreter running the tests (a "python3" kernel spec written into this test's
own JUPYTER_PATH), so it is the same venv whether qsftp is pip-installed or on PYTHONPATH.
Every location a kernel or qsftp would write to (IPython profile, Jupyter runtime files,
certificates, known hosts, test-file cache) is in the test's tmp_path.
"""

from __future__ import annotations

import ast
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
# Bounds only: each notebook runs in under 10 s here, but in a fresh venv the kernel's first
# matplotlib import builds the font cache.
CELL_TIMEOUT = 300
pytestmark = pytest.mark.timeout(300)

SMALL_QUICKSTART = "FILE_SIZE = 100_000\nCHUNK_SIZE = 16_384\n"


def small_sweep(tmp_path: Path) -> str:
    return (
        'SIZES = ["10KB", "100KB"]\n'
        "CHUNK_SIZES = [4096, 65536]\n"
        "REPEATS = 1\n"
        'DIRECTION = "both"\n'
        "SEED = 1\n"
        f"RESULTS_DIR = {str(tmp_path / 'results')!r}\n"
        "PROGRESS = False\n"
    )


def assigned_names(source: str) -> set[str]:
    tree = ast.parse(source)
    return {
        target.id
        for node in tree.body
        if isinstance(node, ast.Assign)
        for target in node.targets
        if isinstance(target, ast.Name)
    }


@pytest.fixture
def kernel_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A "python3" kernel spec for this interpreter, and every write location in tmp_path
    (the kernel inherits this process's environment)."""
    spec = tmp_path / "jupyter" / "kernels" / "python3"
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    kernel = {"argv": argv, "display_name": "Python 3 (tests)", "language": "python"}
    (spec / "kernel.json").write_text(json.dumps(kernel))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "jupyter-runtime"))
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
    (tmp_path / "tmp").mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))  # the notebooks' temporary dirs
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    pythonpath = [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(pythonpath))
    for name in ("STATE", "CONFIG", "CACHE"):
        monkeypatch.setenv(f"QSFTP_{name}_DIR", str(tmp_path / f"qsftp-{name.lower()}"))
    monkeypatch.delenv("QSFTP_KNOWN_HOSTS", raising=False)
    monkeypatch.delenv("QSFTP_TOKEN", raising=False)


def run_notebook(name: str, parameters: str, workdir: Path) -> Any:
    """Execute ``notebooks/<name>`` in ``workdir`` with its parameters cell replaced; return
    the executed notebook (the file itself is not changed)."""
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    tagged = [c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1, f"{name} needs exactly one cell tagged 'parameters'"
    assert assigned_names(parameters) == assigned_names(tagged[0].source), (
        "the test's small parameters must set the same names as the notebook's"
    )
    tagged[0].source = parameters
    workdir.mkdir(parents=True, exist_ok=True)  # the kernel's working directory
    client = NotebookClient(
        nb,
        kernel_name="python3",
        timeout=CELL_TIMEOUT,
        resources={"metadata": {"path": str(workdir)}},
    )
    client.execute()  # raises CellExecutionError on the first failing cell
    return nb


def outputs(nb: Any) -> list[Any]:
    return [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs]


def text_of(nb: Any) -> str:
    parts = []
    for out in outputs(nb):
        parts.append(out.get("text", ""))
        parts.append(out.get("data", {}).get("text/plain", ""))
    return "\n".join(parts)


@pytest.mark.parametrize(
    "name",
    [
        "01_quickstart.ipynb",
        "02_sizes_and_chunks.ipynb",
        "03_network_conditions.ipynb",
        "04_inside_quic.ipynb",
    ],
)
def test_the_committed_notebook_keeps_its_outputs(name: str) -> None:
    """Outputs are part of the notebook: a reader sees results without running it."""
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(c.execution_count for c in code), f"{name} is saved unexecuted"
    assert not [o for c in code for o in c.outputs if o.output_type == "error"], name


def test_quickstart_runs_and_shows_the_verified_checksum(kernel_env: None, tmp_path: Path) -> None:
    nb = run_notebook("01_quickstart.ipynb", SMALL_QUICKSTART, tmp_path / "run")
    text = text_of(nb)
    assert re.findall(r"^verified:\s+(\S+)$", text, re.MULTILINE) == ["True", "True"]
    ours = re.findall(r"^sha256 \(qsftp\):\s+([0-9a-f]{64})$", text, re.MULTILINE)
    theirs = re.findall(r"^sha256 \(hashlib\):\s+([0-9a-f]{64})$", text, re.MULTILINE)
    assert len(ours) == 2 and ours == theirs
    assert "demo/demo.bin" in text  # the listing
    assert "server stopped" in text
    assert list((tmp_path / "tmp").iterdir()) == []  # the demo removed its directory


def test_sweep_notebook_runs_and_draws_its_figures(kernel_env: None, tmp_path: Path) -> None:
    nb = run_notebook("02_sizes_and_chunks.ipynb", small_sweep(tmp_path), tmp_path / "run")
    images = [o for o in outputs(nb) if "image/png" in o.get("data", {})]
    assert len(images) >= 6  # sizes, chunk sizes, two heatmaps, two distributions
    assert "9 transfers (0 failed, 1 warm-up)" in text_of(nb)
    results = tmp_path / "results"
    assert {"sweep.parquet", "sweep.csv", "sweep.csv.meta.json", "sweep.png"} <= {
        p.name for p in results.iterdir()
    }
    assert not list((tmp_path / "run").glob("*.csv"))  # nothing written beside the notebook


SMALL_INSIDE = "FILE_SIZE = 300_000\nDELAY_MS = 5.0\nLOSS = 0.02\nRATE_MBPS = 40.0\nSEED = 1\n"


def test_inside_quic_notebook_loads_the_trace_and_plots_it(
    kernel_env: None, tmp_path: Path
) -> None:
    nb = run_notebook("04_inside_quic.ipynb", SMALL_INSIDE, tmp_path / "run")
    text = text_of(nb)
    assert "verified: True" in text
    assert "packets declared lost" in text
    assert any("image/png" in o.get("data", {}) for o in outputs(nb))
    assert list((tmp_path / "tmp").iterdir()) == []  # the demo removed its directory


# Two losses, two delays, one repeat: 5 + 9 + 3 transfers (warm-ups included) and two traced
# uploads, plus the QUIC vs TCP cells (the packet-level one only where it can run).
SMALL_NETWORK = (
    "RATE_MBPS = 50.0\n"
    "DATAGRAM_SIZE = 1452\n"
    "LOSSES = [0.0, 0.02]\n"
    "LOSS_DELAY_MS = 5.0\n"
    'LOSS_FILE_SIZE = "300KB"\n'
    "DELAYS_MS = [0.0, 10.0]\n"
    'FILE_SIZES = ["50KB", "300KB"]\n'
    "SMALL_WINDOW = 262_144\n"
    'CONGESTION_CONTROLS = ["reno", "cubic"]\n'
    "REPEATS = 1\n"
    "QLOG_LOSS = 0.02\n"
    "SEED = 1\n"
    "PROGRESS = False\n"
)


def test_network_notebook_sweeps_loss_and_delay_and_traces_both_algorithms(
    kernel_env: None, tmp_path: Path
) -> None:
    nb = run_notebook("03_network_conditions.ipynb", SMALL_NETWORK, tmp_path / "run")
    text = text_of(nb)
    assert "loss sweep: 5 transfers (0 failed, 1 warm-up)" in text
    assert "delay sweep: 9 transfers (0 failed, 1 warm-up)" in text
    assert "window sweep: 3 transfers (0 failed, 1 warm-up)" in text
    assert re.search(r"^reno: verified True", text, re.MULTILINE)
    assert re.search(r"^cubic: verified True", text, re.MULTILINE)
    assert "Mathis constant with this cut" in text
    # QUIC vs TCP runs where sweep() has transport=, and otherwise says why it did not.
    assert "QUIC vs TCP, delay:" in text or "QUIC vs TCP: skipped" in text
    images = [o for o in outputs(nb) if "image/png" in o.get("data", {})]
    assert len(images) >= 4  # loss, qlog, delay, window
    assert list((tmp_path / "tmp").iterdir()) == []  # the notebook removed its directory
