"""Deployment files written next to each GGUF: an Ollama Modelfile and two LM Studio presets."""

from __future__ import annotations

import json
from pathlib import Path

from ..files import write_text_atomic
from ..templates import ChatFamily
from .lmstudio import current_preset, install_hint, legacy_preset
from .ollama import modelfile_text, ollama_create, read_modelfile

__all__ = ["write_deploy_files", "deploy_paths", "ollama_create", "modelfile_text", "read_modelfile",
           "current_preset", "legacy_preset", "install_hint"]


def deploy_paths(gguf_path: Path) -> dict[str, Path]:
    """The deployment file names for a GGUF: `<stem>.Modelfile`, `<stem>.preset.json`, `<stem>.legacy.preset.json`."""
    gguf_path = Path(gguf_path)
    stem = gguf_path.name[: -len(".gguf")] if gguf_path.name.endswith(".gguf") else gguf_path.name
    folder = gguf_path.parent
    return {
        "modelfile": folder / f"{stem}.Modelfile",
        "preset": folder / f"{stem}.preset.json",
        "legacy_preset": folder / f"{stem}.legacy.preset.json",
    }


def _json(data: dict) -> str:
    return json.dumps(data, ensure_ascii=False, indent=2) + "\n"


def write_deploy_files(gguf_path: Path, family: ChatFamily, model_name: str, num_ctx: int) -> list[Path]:
    """Write the Modelfile and both LM Studio presets next to `gguf_path` (each atomically); return their paths.

    The GGUF itself need not exist yet: the Modelfile refers to it by its file name, relative to the Modelfile.
    """
    gguf_path = Path(gguf_path)
    paths = deploy_paths(gguf_path)
    contents = {
        "modelfile": modelfile_text(gguf_path.name, family, num_ctx),
        "preset": _json(current_preset(family, model_name, num_ctx)),
        "legacy_preset": _json(legacy_preset(family, model_name, num_ctx)),
    }
    for key, text in contents.items():
        write_text_atomic(paths[key], text)
    return list(paths.values())
