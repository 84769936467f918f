"""Keep a source checkout's role folders from shadowing other distributions.

The checkout keeps each role in a top-level folder (``engine/``, ``kernels/``, ...);
they install as ``splitserve.engine``, ``splitserve.kernels``, ... But whenever the
checkout's root is on ``sys.path`` (``python -c``/``-m`` run there, pytest's
``pythonpath``, and every Ray worker of a driver started there: Ray adds the driver's
working directory to its workers' path), ``import kernels`` finds the checkout's
folder before an installed distribution of that name. transformers >= 5.25 imports
Hugging Face's ``kernels`` package, so a Serve replica started from the checkout
failed to load any model.

``hide_role_folders(root)`` installs a path hook that serves the checkout root like
any directory except for top-level imports of the role folders' names, which it
leaves to the rest of ``sys.path``. ``splitserve.engine`` and the like still resolve
there, through the package's own ``__path__``.
"""

from __future__ import annotations

import os
import sys
from importlib.machinery import ModuleSpec
from typing import Any, Callable

ROLE_FOLDERS = frozenset({"engine", "kernels", "transfer", "prefill", "decode", "scheduler"})


class _RootWithoutRoleFolders:
    """The checkout root's path-entry finder, minus top-level imports of the role folders."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def find_spec(self, name: str, target: Any = None) -> ModuleSpec | None:
        if name in ROLE_FOLDERS:
            return None
        return self._inner.find_spec(name, target)

    def invalidate_caches(self) -> None:
        if hasattr(self._inner, "invalidate_caches"):
            self._inner.invalidate_caches()


def _hook_for(root: str) -> Callable[[str], _RootWithoutRoleFolders]:
    def hook(path: str) -> _RootWithoutRoleFolders:
        if _real(path) != root:
            raise ImportError("not the checkout root")  # the next hook serves this entry
        for other in sys.path_hooks:
            if other is hook:
                continue
            try:
                return _RootWithoutRoleFolders(other(path))
            except ImportError:
                continue
        raise ImportError(f"no path hook serves {path}")

    hook.splitserve_root = root  # type: ignore[attr-defined]
    return hook


def _real(path: str) -> str:
    return os.path.realpath(path or os.getcwd())


def hide_role_folders(root: str) -> None:
    """From now on, top-level imports of the role folders' names never resolve under ``root``."""
    root = _real(root)
    if any(getattr(h, "splitserve_root", None) == root for h in sys.path_hooks):
        return
    sys.path_hooks.insert(0, _hook_for(root))
    for entry in [e for e in sys.path_importer_cache if _real(e) == root]:
        del sys.path_importer_cache[entry]  # found again, through the hook
