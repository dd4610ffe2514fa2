"""The wheel works: `pip install .` (not editable) ships every file the CLI reads at run time, and
the installed package runs from a folder outside the repository."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from venvs import venv_seeing_this_interpreter

REPO = Path(__file__).resolve().parents[1]
# Files read at run time by path (not imported): presets, the demo config, DeepSpeed base configs.
DATA_FILES = ["common/config/presets/tiny.yaml", "common/config/presets/mini.yaml",
              "common/config/presets/small.yaml", "common/config/presets/base.yaml", "flows/demo/demo.yaml",
              *[f"gptbert/distributed/configs/zero{i}.json" for i in range(4)]]


@pytest.mark.slow
def test_wheel_holds_what_the_cli_reads_and_runs_outside_the_repo(tmp_path):
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp_path / "dist"), str(REPO)], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-2000:]
    wheel = next((tmp_path / "dist").glob("gptbert-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in DATA_FILES:
        assert name in names, name
    sources = {p.relative_to(REPO).as_posix() for pkg in ("common", "cli", "gptbert", "tokenization", "flows")
               for p in (REPO / pkg).rglob("*.py")}
    assert sources <= names, sorted(sources - names)[:5]
    assert not any(n.startswith(("tests/", "benchmarks/")) for n in names)

    # Install it into a venv that sees the heavy dependencies of this interpreter (system Python or
    # a venv of its own) but not the repository, and run it from an unrelated folder.
    venv = tmp_path / "venv"
    py = venv_seeing_this_interpreter(venv)
    # --ignore-installed: this interpreter's own gptbert (an editable install) is visible there too.
    installed = subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--ignore-installed", str(wheel)],
                               capture_output=True, text=True, timeout=300)
    assert installed.returncode == 0, installed.stderr[-2000:]
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    code = ("import json, common.config, flows.demo, gptbert.distributed.deepspeed_backend as ds;"
            "cfg = flows.demo.demo_config();"
            "d = ds.deepspeed_config(cfg.train, cfg.launch, 2, False);"
            "print(json.dumps({'demo': cfg.model.hidden_size, 'zero': d['zero_optimization']['stage'],"
            "'where': [common.config.__file__, flows.demo.__file__, ds.__file__]}))")
    out = subprocess.run([str(py), "-c", code], cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    import json

    info = json.loads(out.stdout.strip().splitlines()[-1])
    assert info["demo"] == 128 and info["zero"] == 1
    assert all(str(venv) in w for w in info["where"]), info["where"]  # the wheel's copy, not the repo
    cli = subprocess.run([str(venv / "bin" / "gptbert"), "model-info", "tiny"], cwd=work, env=env,
                         capture_output=True, text=True, timeout=300)
    assert cli.returncode == 0, cli.stderr[-2000:]
    assert json.loads(cli.stdout)["parameters"] > 0
