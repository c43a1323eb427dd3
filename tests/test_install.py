"""Installing without surprises: the extras take current torch (no single-version pin), CI puts
the CPU torch wheel in before them, the README's two commands use separate environments and an
editable install, and `import flaxauto` works from the clone root."""

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import torch
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]


def _torch_requirement(extra: str) -> Requirement:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    found = [Requirement(r) for r in project["optional-dependencies"][extra]]
    (torch_requirement,) = [r for r in found if r.name == "torch"]
    return torch_requirement


def test_the_extras_admit_current_and_newer_torch():
    for extra in ("test", "demo"):
        specifier = _torch_requirement(extra).specifier
        installed = Version(torch.__version__.split("+")[0])
        assert specifier.contains(installed) and specifier.contains("99.0"), (extra, specifier)


def test_ci_installs_the_cpu_torch_wheel_before_the_extras():
    lines = [line.split("#")[0].strip() for line in (ROOT / ".ci/run").read_text().splitlines()]
    torch_line = next(i for i, line in enumerate(lines) if re.match(r"pip install .*torch==", line))
    extras_line = next(i for i, line in enumerate(lines) if "'.[test]'" in line)
    assert torch_line < extras_line and "-e '.[test]'" in lines[extras_line]


def _readme_block(heading: str) -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    return section.split("```bash\n", 1)[1].split("```", 1)[0]


def test_the_two_readme_commands_use_separate_editable_environments():
    commands = [line for line in _readme_block("The two commands").splitlines() if "venv" in line]
    assert len(commands) == 2
    environments = [re.search(r"venv (\S+) &&", line).group(1) for line in commands]
    assert len(set(environments)) == 2
    assert all("pip install -e '" in line for line in commands)
    assert "--index-url https://download.pytorch.org/whl/cpu" in _readme_block("Install") + (
        (ROOT / "README.md").read_text()
    )


def test_import_flaxauto_from_the_clone_root():
    code = "import flaxauto, flaxauto.heads, flaxauto.converters.files as f; print(f.__file__)"
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert Path(done.stdout.strip()).parent == ROOT / "converters"
