"""splitserve: disaggregated prefill/decode LLM serving.

The public surface: ``LLM`` and ``SamplingParams`` for offline generation.
"""

from __future__ import annotations

from pathlib import Path as _Path

# In a source checkout the role folders (engine/, kernels/, ...) sit beside this
# package; make them importable as splitserve.<role> without an install step, and
# never as top-level packages (kernels/ would shadow Hugging Face's `kernels`).
_root = _Path(__file__).resolve().parent.parent
if (_root / "pyproject.toml").is_file() and (_root / "engine").is_dir():
    from splitserve.checkout_guard import hide_role_folders as _hide_role_folders

    _hide_role_folders(str(_root))
    __path__.append(str(_root))  # type: ignore[name-defined]

from splitserve.engine.sampling_params import SamplingParams  # noqa: E402

__all__ = ["LLM", "SamplingParams", "RequestOutput", "Client", "AsyncClient", "__version__"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # LLM pulls in torch and transformers; import it lazily so `splitserve --help` is fast.
    if name == "LLM":
        from splitserve.llm import LLM

        return LLM
    if name == "RequestOutput":
        from splitserve.engine.outputs import RequestOutput

        return RequestOutput
    if name in ("Client", "AsyncClient"):
        from splitserve import client

        return getattr(client, name)
    raise AttributeError(name)
