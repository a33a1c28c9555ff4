"""Recipes: what l3zh-local knows about each model of the seed (data: the `*.toml` files beside this module).

A recipe names the model's hub and ModelScope ids, its chat family, its default system prompt if it differs from
the family's, its context length, and the GGUF files its authors published. `regenerate_modelfiles` writes the
deployment files of those published GGUFs into `modelfiles/`.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InputError
from ..templates import ChatFamily, get_family, with_default_system

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10
    import tomli as tomllib

RECIPES_ENV = "L3ZH_RECIPES"


@dataclass(frozen=True)
class PublishedGGUF:
    file: str  # the file name as published
    repo: str  # where it is published (hub id)
    quant: str


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    family_name: str
    context_length: int  # the model's own limit
    num_ctx: int  # the context the deployment files ask for
    hub_id: str | None = None
    modelscope_id: str | None = None
    default_system: str | None = None  # None: the family's default
    ggufs: tuple[PublishedGGUF, ...] = field(default_factory=tuple)
    path: Path | None = None
    ctx: int | None = None  # export --ctx: the context the GGUF declares (context.py)
    rope_theta: float | None = None  # export --rope-theta: the RoPE base the GGUF declares

    @property
    def family(self) -> ChatFamily:
        family = get_family(self.family_name)
        return with_default_system(family, self.default_system) if self.default_system is not None else family


def recipes_dir() -> Path:
    """The recipes installed with the package (this module's folder), or the folder in $L3ZH_RECIPES."""
    env = os.environ.get(RECIPES_ENV)
    return Path(env) if env else Path(__file__).resolve().parent


_KEYS = {"name", "description", "hub_id", "modelscope_id", "family", "default_system", "context_length", "num_ctx",
         "gguf", "ctx", "rope_theta"}


def _read(path: Path) -> Recipe:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise InputError(f"recipe {path} is not valid TOML: {exc}") from None
    unknown = set(data) - _KEYS
    missing = {"name", "family", "context_length", "num_ctx"} - set(data)
    if unknown or missing:
        raise InputError(f"recipe {path}: unknown keys {sorted(unknown)}, missing keys {sorted(missing)}")
    get_family(data["family"])  # fail early on a misspelt family
    return Recipe(
        name=data["name"], description=data.get("description", ""), family_name=data["family"],
        context_length=int(data["context_length"]), num_ctx=int(data["num_ctx"]), hub_id=data.get("hub_id"),
        modelscope_id=data.get("modelscope_id"), default_system=data.get("default_system"),
        ggufs=tuple(PublishedGGUF(g["file"], g["repo"], g["quant"]) for g in data.get("gguf", [])), path=path,
        ctx=int(data["ctx"]) if "ctx" in data else None,
        rope_theta=float(data["rope_theta"]) if "rope_theta" in data else None,
    )


def all_recipes() -> list[Recipe]:
    folder = recipes_dir()
    if not folder.is_dir():
        raise InputError(f"no recipes folder at {folder}: set {RECIPES_ENV} to a folder of recipe *.toml files")
    return [_read(p) for p in sorted(folder.glob("*.toml"))]


def find_recipe(name_or_id: str) -> Recipe | None:
    """The recipe whose name, hub id or ModelScope id is `name_or_id` (case-insensitive), or None."""
    key = name_or_id.strip().lower()
    for recipe in all_recipes():
        if key in {x.lower() for x in (recipe.name, recipe.hub_id, recipe.modelscope_id) if x}:
            return recipe
    return None


def load_recipe(name_or_hub_id: str) -> Recipe:
    """Like `find_recipe`, but an unknown name is an InputError listing the known ones."""
    recipe = find_recipe(name_or_hub_id)
    if recipe is None:
        names = ", ".join(r.name for r in all_recipes())
        raise InputError(f"no recipe for {name_or_hub_id!r}: known models are {names}; or pass --template NAME")
    return recipe


def regenerate_modelfiles(out: Path = Path("modelfiles")) -> list[Path]:
    """Write the Modelfile and both LM Studio presets of every published GGUF of every recipe into `out`;
    remove deployment files there that no recipe produces any more. Return the files written."""
    from ..deploy import write_deploy_files
    from ..files import ensure_writable_dir

    out = ensure_writable_dir(Path(out))
    written: list[Path] = []
    for recipe in all_recipes():
        for gguf in recipe.ggufs:
            written += write_deploy_files(out / gguf.file, recipe.family, recipe.name, recipe.num_ctx)
    for stale in out.iterdir():
        if stale.is_file() and stale not in written and stale.name.endswith((".Modelfile", ".preset.json")):
            stale.unlink()
    return written
