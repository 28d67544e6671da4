"""The command line's entry points: `python -m stompp_hf --version` and the `stompp-hf` console script."""

from __future__ import annotations

import os
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest

import stompp_hf
from stompp_hf.__main__ import main

ROOT = Path(__file__).resolve().parents[1]


def test_version_flag(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"stompp_hf {stompp_hf.__version__}"


def test_python_dash_m_version():
    out = subprocess.run(
        [sys.executable, "-m", "stompp_hf", "--version"], capture_output=True, text=True, timeout=300, check=True
    )
    assert out.stdout.strip() == f"stompp_hf {stompp_hf.__version__}"


def test_console_script_is_declared_and_installed():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert declared == {"stompp-hf": "stompp_hf.__main__:main"}
    installed = {e.name: e.value for e in entry_points(group="console_scripts")}
    if "stompp-hf" not in installed:
        pytest.skip("stompp_hf is installed without its entry points (reinstall: pip install -e .)")
    assert installed["stompp-hf"] == "stompp_hf.__main__:main"
    script = Path(sys.executable).with_name("stompp-hf")
    if script.is_file():
        out = subprocess.run([str(script), "--version"], capture_output=True, text=True, timeout=300, check=True)
        assert out.stdout.strip() == f"stompp_hf {stompp_hf.__version__}"
        help_text = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=300).stdout
        assert help_text.startswith("usage: stompp-hf") and os.path.basename(str(script)) == "stompp-hf"
