"""`ovlt --help` lists every sub-command; the Dockerfile only COPYs paths that exist."""
import re
import subprocess
import sys
from pathlib import Path

from ovlt.cli import COMMANDS

ROOT = Path(__file__).resolve().parents[2]


def test_help_lists_subcommands():
    out = subprocess.run([sys.executable, "-m", "ovlt", "--help"], capture_output=True, text=True,
                         cwd=ROOT, check=True).stdout
    for name in COMMANDS:
        assert re.search(rf"^\s+{name}\s", out, re.M), name


def test_unknown_command_exits_2():
    r = subprocess.run([sys.executable, "-m", "ovlt", "frobnicate"], capture_output=True,
                       text=True, cwd=ROOT)
    assert r.returncode == 2 and "unknown command 'frobnicate'" in r.stderr


def test_every_command_target_imports():
    import importlib
    for name, (target, _) in COMMANDS.items():
        mod, fn = target.split(":")
        assert callable(getattr(importlib.import_module(mod), fn)), name


def test_config_command_reports_bad_value():
    r = subprocess.run([sys.executable, "-m", "ovlt", "config", "rollout.top_p=2"],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and "rollout.top_p" in r.stderr


def test_dockerfile_copies_existing_paths():
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM nvcr\.io/nvidia/pytorch:", text, re.M)
    copies = re.findall(r"^COPY\s+(.+)$", text, re.M)
    assert copies
    for line in copies:
        *srcs, _dst = line.split()
        for s in srcs:
            assert (ROOT / s).exists(), f"Dockerfile COPYs missing path {s}"
    assert "pip install" in text and ".[gpu" in text


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    blocks = re.findall(r"```(?:bash|sh)?\n(.*?)```", readme, re.S)
    test_cmd = next(line for b in blocks for line in b.splitlines() if "pytest" in line).strip()
    assert test_cmd.split("pytest", 1)[1].strip() in ci


def test_setup_pins_megatron_core():
    text = (ROOT / "setup.py").read_text()
    assert '"megatron-core==0.16.1"' in text
    assert "console_scripts" in text and "ovlt=ovlt.cli:main" in text


def test_no_top_level_package_shadows_installed_ones():
    """Run from the repo root, none of our folders may be imported in place of an installed
    package: a top-level `kernels/` did that to Hugging Face's `kernels`, which transformers
    >= 5.25 imports (`from kernels import CUDAProperties` failed, and with it every HF model)."""
    code = ("import importlib.util as u, json; "
            "print(json.dumps({n: getattr(u.find_spec(n), 'origin', None) "
            "for n in ('kernels', 'transformers', 'torch')}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, check=True).stdout
    import json
    for name, origin in json.loads(out).items():
        assert origin is None or not Path(origin).resolve().is_relative_to(ROOT) \
            or ".venv" in Path(origin).parts, (name, origin)
    packages = [p.name for p in ROOT.iterdir() if (p / "__init__.py").exists()]
    assert sorted(packages) == ["launchers", "ovlt", "tests"], packages
