"""The package reads strictly downwards: the import contracts of pyproject.toml ([tool.importlinter]: entry
points, stages, training loop, runtime, model, algorithms, foundations; the algorithms pure) hold, and no
module imports one that imports it back (directly or through others), function-level imports included."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_import_contracts_hold():
    exe = Path(sys.executable).with_name("lint-imports")
    proc = subprocess.run([str(exe)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "0 broken" in proc.stdout and "2 kept" in proc.stdout, proc.stdout[-2000:]


def test_no_import_cycles():
    import grimp

    graph = grimp.build_graph("marl_ray")
    cycles = sorted({tuple(sorted((m, n))) for m in graph.modules
                     for n in graph.find_modules_directly_imported_by(m)
                     if graph.chain_exists(importer=n, imported=m)})
    assert not cycles, cycles
