"""Resolve what the user named into a local HF folder: the embedded demo, a local folder, or a hub id.

Hub ids go through huggingface_hub (which honours HF_ENDPOINT mirrors such as hf-mirror.com, HF_HOME and tokens)
or, with a ``modelscope:`` prefix, through the modelscope package. Only the files a conversion needs are fetched
(safetensors, JSON, tokenizer files): never pickles unless asked, never remote code.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .errors import InputError, OfflineError

MODELSCOPE_PREFIX = "modelscope:"
HF_PREFIX = "hf:"
_NEEDED = ["*.json", "*.safetensors", "tokenizer.model", "*.jinja", "*.tiktoken", "merges.txt", "vocab.txt"]
_PICKLES = ["*.bin", "*.pt", "*.pth"]


@dataclass(frozen=True)
class ModelSource:
    path: Path  # a local HF folder
    kind: str  # "demo", "local", "huggingface" or "modelscope"
    ref: str  # what the user gave (or the demo's name)
    revision: str | None = None  # the hub commit that was fetched

    @property
    def is_demo(self) -> bool:
        return self.kind == "demo"

    def describe(self) -> dict:
        return {"kind": self.kind, "ref": self.ref, "path": str(self.path), "revision": self.revision}


def resolve(spec: str | None, *, revision: str | None = None, allow_pickle: bool = False) -> ModelSource:
    """Turn a model argument into a local folder, downloading from a hub when needed."""
    if spec is None:
        from . import demo

        return ModelSource(path=demo.demo_model_dir(), kind="demo", ref=demo.DEMO_NAME)
    if spec.startswith(MODELSCOPE_PREFIX):
        return _from_modelscope(spec[len(MODELSCOPE_PREFIX):], revision, allow_pickle)
    if spec.startswith(HF_PREFIX):
        return _from_huggingface(spec[len(HF_PREFIX):], revision, allow_pickle)
    local = Path(spec).expanduser()
    if local.exists() or spec.startswith((".", "/", "~")) or spec.count("/") != 1:
        return ModelSource(path=local, kind="local", ref=spec)
    return _from_huggingface(spec, revision, allow_pickle)


def _patterns(allow_pickle: bool) -> list[str]:
    return _NEEDED + (_PICKLES if allow_pickle else [])


def hub_endpoint() -> str:
    """The Hugging Face endpoint in use (HF_ENDPOINT, e.g. https://hf-mirror.com)."""
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co")


@contextlib.contextmanager
def hub_lookup_errors(repo_id: str, revision: str | None) -> Iterator[None]:
    """Turn huggingface_hub's answers that the repository or revision is not there into one-line InputErrors."""
    from huggingface_hub import errors

    try:
        yield
    except errors.GatedRepoError:  # before RepositoryNotFoundError, of which it is a kind
        raise InputError(f"{repo_id} is gated: accept its licence on the hub, then `hf auth login`") from None
    except errors.RepositoryNotFoundError:
        raise InputError(f"{repo_id} is not a model on {hub_endpoint()} (or it is private: run `hf auth login`)"
                         ) from None
    except errors.RevisionNotFoundError:
        raise InputError(f"{repo_id} has no revision {revision!r}") from None


def _from_huggingface(repo_id: str, revision: str | None, allow_pickle: bool) -> ModelSource:
    import huggingface_hub
    from huggingface_hub import errors

    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "20")
    endpoint = hub_endpoint()
    try:
        with hub_lookup_errors(repo_id, revision):
            path = huggingface_hub.snapshot_download(repo_id, revision=revision,
                                                     allow_patterns=_patterns(allow_pickle))
    except (errors.LocalEntryNotFoundError, OSError) as exc:
        if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
            raise OfflineError(f"{repo_id} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set; "
                               "unset it to download, or pass a local folder") from None
        raise OfflineError(
            f"cannot download {repo_id} from {endpoint} ({_first_line(exc)}); check the network, set "
            "HF_ENDPOINT=https://hf-mirror.com in China, use modelscope:<id>, or pass a local folder"
        ) from None
    folder = Path(path)
    return ModelSource(path=folder, kind="huggingface", ref=repo_id, revision=revision or folder.name)


def _from_modelscope(model_id: str, revision: str | None, allow_pickle: bool) -> ModelSource:
    try:
        from modelscope import snapshot_download
    except ImportError:
        raise InputError("modelscope ids need the modelscope package: pip install 'l3zh-local[modelscope]'") from None
    try:
        path = snapshot_download(model_id, revision=revision, allow_patterns=_patterns(allow_pickle))
    except Exception as exc:  # modelscope raises plain exceptions for network and lookup failures alike
        raise OfflineError(f"cannot download {model_id} from ModelScope ({_first_line(exc)}); check the network "
                           "or pass a local folder") from None
    return ModelSource(path=Path(path), kind="modelscope", ref=model_id, revision=revision)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__
