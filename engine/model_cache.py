"""Checkpoints made on this machine, built once into a cache and shared by every process.

``cached_checkpoint(name, build)`` returns ``$SPLITSERVE_CACHE/models/<name>`` (default
``~/.cache/splitserve``), calling ``build(tmp_dir)`` the first time. The build runs
in a temporary directory beside the target, under an exclusive ``fcntl`` lock, and
is renamed into place when complete, so several processes starting at once (Ray
workers) build it once and never see a half-written directory; later calls cost a
``stat``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

CACHE_ENV_VAR = "SPLITSERVE_CACHE"


def cache_root() -> Path:
    """``$SPLITSERVE_CACHE``, or ``~/.cache/splitserve`` when unset or empty."""
    env = os.environ.get(CACHE_ENV_VAR)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "splitserve"


def is_complete_checkpoint(path: Path) -> bool:
    has_weights = (path / "model.safetensors").is_file() or (path / "model.safetensors.index.json").is_file()
    return has_weights and (path / "config.json").is_file() and (path / "tokenizer.json").is_file()


def cached_checkpoint(name: str, build: Callable[[Path], None]) -> Path:
    """Path of the cached checkpoint ``name``, built once by ``build(dir)`` if missing (process-safe)."""
    import fcntl

    models_dir = cache_root() / "models"
    final = models_dir / name
    if is_complete_checkpoint(final):
        return final
    models_dir.mkdir(parents=True, exist_ok=True)
    with open(models_dir / f".{name}.lock", "a+") as lock_file:
        fcntl.flock(lock_file.fileno(), fcntl.LOCK_EX)
        try:
            if is_complete_checkpoint(final):  # another process built it while we waited
                return final
            _remove_leftovers(models_dir, final)
            tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=models_dir))
            try:
                build(tmp)
                _make_readable(tmp)
                os.rename(tmp, final)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        finally:
            fcntl.flock(lock_file.fileno(), fcntl.LOCK_UN)
    return final


def _remove_leftovers(models_dir: Path, final: Path) -> None:
    """Under the lock: drop temp dirs of crashed builders and a damaged final dir."""
    for stale in models_dir.glob(f".{final.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    if final.exists():
        aside = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=models_dir))
        os.rename(final, aside / "damaged")
        shutil.rmtree(aside, ignore_errors=True)


def _make_readable(path: Path) -> None:
    """mkdtemp makes the directory 0700 and transformers may write 0600 files."""
    os.chmod(path, 0o755)
    for child in path.iterdir():
        os.chmod(child, 0o644)
