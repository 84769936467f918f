"""A checkout's role folders never shadow installed distributions of the same name.

transformers >= 5.25 imports Hugging Face's ``kernels`` package; with the checkout root on
``sys.path`` (a shell in the checkout, pytest, every Ray worker of a driver started there)
``import kernels`` used to find this repo's ``kernels/`` folder instead. Each case runs in a
fresh interpreter whose working directory is the checkout, beside a stand-in ``kernels``
distribution on PYTHONPATH.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """A directory holding a stand-in for Hugging Face's ``kernels`` and an unrelated ``engine``."""
    site = tmp_path_factory.mktemp("site")
    for name in ("kernels", "engine"):
        (site / name).mkdir()
        (site / name / "__init__.py").write_text(f"WHO = 'installed {name}'\n")
    return site


def run_in_checkout(code: str, pythonpath: Path) -> list[str]:
    env = {**os.environ, "PYTHONPATH": str(pythonpath)}
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.split()


def test_without_the_guard_the_checkout_folder_shadows_the_installed_package(site):
    """The hazard itself, so the test below cannot pass for the wrong reason."""
    (where,) = run_in_checkout("import kernels; print(kernels.__file__)", site)
    assert Path(where) == REPO / "kernels" / "__init__.py"


def test_after_importing_splitserve_the_installed_packages_win(site):
    code = (
        "import splitserve, kernels, engine\n"
        "import splitserve.kernels, splitserve.engine.sampling_params, tests.helpers\n"
        "print(kernels.WHO.replace(' ', '_'), engine.WHO.replace(' ', '_'))\n"
        "print(splitserve.kernels.__file__, splitserve.engine.sampling_params.__file__, tests.helpers.__file__)\n"
    )
    top_kernels, top_engine, ours_kernels, ours_engine, helpers = run_in_checkout(code, site)
    assert (top_kernels, top_engine) == ("installed_kernels", "installed_engine")
    # the package's own names and the checkout's other top-level packages still resolve in the checkout
    assert Path(ours_kernels) == REPO / "kernels" / "__init__.py"
    assert Path(ours_engine) == REPO / "engine" / "sampling_params.py"
    assert Path(helpers) == REPO / "tests" / "helpers.py"


def test_a_role_folder_with_nothing_installed_under_its_name_is_not_importable_top_level(tmp_path):
    code = (
        "import splitserve\n"
        "try:\n    import scheduler\nexcept ModuleNotFoundError:\n    print('absent')\n"
        "else:\n    print(scheduler.__file__)\n"
    )
    assert run_in_checkout(code, tmp_path) == ["absent"]
