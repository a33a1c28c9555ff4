"""What a user needs to serve an export elsewhere, written beside each GGUF by `export`.

- ``<stem>.llama-server.sh``: the exact llama.cpp ``llama-server`` command: ``--jinja`` (the GGUF's own template,
  rendered by llama.cpp's Jinja engine), ``-c`` = context per slot x slots, ``-np`` slots, the family's sampling
  defaults, and ``--chat-template-file`` only when the GGUF's own template is not the family's.
- ``<stem>.model.yaml``: LM Studio's model.yaml (context length in the load config, template and stops in the
  operation config), since a preset cannot carry load settings.
- ``<name>.vllm/`` (once per export, for the 16-bit weights; merged first when an adapter was given):
  ``chat_template.jinja``, ``generation_config.json`` whose ``eos_token_id`` lists every stop id of the family
  (vLLM stops on each of them), and ``serve.sh`` with the ``vllm serve`` command.
"""

from __future__ import annotations

import json
import shlex
import struct
from dataclasses import dataclass
from pathlib import Path

from ..deploy.lmstudio import model_yaml
from ..errors import InputError
from ..files import write_text_atomic
from ..templates import ChatFamily, normalise_template

LLAMA_SERVER_SLOTS = 4  # llama-server's own default number of slots


@dataclass(frozen=True)
class VllmSource:
    """Where vLLM takes the 16-bit weights from."""

    model: str  # an HF folder (absolute path) or a hub id
    revision: str | None = None
    modelscope: bool = False  # a ModelScope id: vLLM fetches it with VLLM_USE_MODELSCOPE=True
    adapter: str | None = None  # a LoRA adapter to merge first (l3zh-local merge), folder or hub id


def bundle_paths(gguf: Path) -> dict[str, Path]:
    gguf = Path(gguf)
    stem = gguf.name.removesuffix(".gguf")
    return {"llama_server": gguf.parent / f"{stem}.llama-server.sh",
            "chat_template": gguf.parent / f"{stem}.chat_template.jinja",
            "model_yaml": gguf.parent / f"{stem}.model.yaml"}


def gguf_strings(gguf: Path, keys: set[str]) -> dict[str, object]:
    """Some metadata of a GGUF, its token list included, read straight from the header (no model load)."""
    from ..ggufmeta import _Cursor

    found: dict[str, object] = {}
    try:
        with open(gguf, "rb") as fh:
            cur = _Cursor(fh)
            fh.read(4)
            cur.unpack("<I")
            cur.unpack("<Q")
            for _ in range(cur.unpack("<Q")):
                key = cur.string()
                vtype = cur.unpack("<I")
                if key == "tokenizer.ggml.tokens" and key in keys:
                    cur.unpack("<I")  # element type: string
                    found[key] = [cur.string() for _ in range(cur.unpack("<Q"))]
                else:
                    value = cur.value(vtype)
                    if key in keys:
                        found[key] = value
    except (OSError, ValueError, struct.error) as exc:
        raise InputError(f"{gguf} is not a readable GGUF file ({exc})") from None
    return found


def llama_server_command(gguf: Path, family: ChatFamily, model_name: str, num_ctx: int, *,
                         slots: int = LLAMA_SERVER_SLOTS, template_file: Path | None = None) -> list[str]:
    """The llama-server command line (GGUF and template as paths relative to the GGUF's folder)."""
    s = family.sampling
    command = ["llama-server", "-m", Path(gguf).name, "--alias", model_name, "--jinja",
               "-c", str(num_ctx * slots), "-np", str(slots),
               "--temp", str(s.temperature), "--top-p", str(s.top_p), "--top-k", str(s.top_k),
               "--min-p", str(s.min_p), "--repeat-penalty", str(s.repeat_penalty), "-n", str(s.max_tokens),
               "--host", "127.0.0.1", "--port", "8080"]
    if template_file is not None:
        command[6:6] = ["--chat-template-file", template_file.name]
    return command


def write_bundles(gguf: Path, family: ChatFamily, model_name: str, num_ctx: int, *,
                  vllm: VllmSource | None = None, slots: int = LLAMA_SERVER_SLOTS) -> list[Path]:
    """Write the llama-server command and LM Studio's model.yaml beside `gguf` (and, with `vllm`, the vLLM bundle);
    return the paths written. The GGUF must exist: its own template and vocabulary are read."""
    gguf = Path(gguf)
    paths = bundle_paths(gguf)
    meta = gguf_strings(gguf, {"tokenizer.chat_template", "tokenizer.ggml.tokens", "tokenizer.ggml.bos_token_id"})
    own = meta.get("tokenizer.chat_template")
    written = []
    template_file = None
    if not isinstance(own, str) or normalise_template(own) != normalise_template(family.jinja):
        # The GGUF carries another template (or none): llama-server must be given the family's.
        write_text_atomic(paths["chat_template"], family.jinja)
        template_file = paths["chat_template"]
        written.append(template_file)
    else:
        paths["chat_template"].unlink(missing_ok=True)
    command = llama_server_command(gguf, family, model_name, num_ctx, slots=slots, template_file=template_file)
    script = [
        "#!/bin/sh",
        f"# llama.cpp's llama-server for {gguf.name} (chat family {family.name}), written by l3zh-local.",
        f"# {slots} slots of {num_ctx} tokens each (-c is their total); the KV cache grows with -c.",
        "# --jinja renders the chat with the template " + ("in the file beside this script (the GGUF's own is "
                                                          "not the family's)." if template_file else
                                                          "inside the GGUF (the family's)."),
        "# Check it once it runs: l3zh-local verify " + shlex.quote(gguf.name) + " --endpoint http://127.0.0.1:8080",
        'cd "$(dirname "$0")" || exit 1',
        "exec " + shlex.join(command) + ' "$@"',
    ]
    write_text_atomic(paths["llama_server"], "\n".join(script) + "\n")
    paths["llama_server"].chmod(0o755)
    write_text_atomic(paths["model_yaml"], model_yaml(family, model_name, gguf.name, num_ctx))
    written += [paths["llama_server"], paths["model_yaml"]]
    if vllm is not None:
        tokens = meta.get("tokenizer.ggml.tokens")
        if not isinstance(tokens, list):
            raise InputError(f"{gguf} has no token list; cannot write the vLLM stop ids")
        bos = meta.get("tokenizer.ggml.bos_token_id")
        written += write_vllm_bundle(gguf.parent / f"{_export_stem(gguf)}.vllm", family, model_name, num_ctx,
                                     vllm, tokens, bos if isinstance(bos, int) else None)
    return written


def _export_stem(gguf: Path) -> str:
    """The export's name: the GGUF's file name without its type (`x.bf16.gguf` -> `x`)."""
    name = gguf.name.removesuffix(".gguf")
    return name.rsplit(".", 1)[0] if "." in name else name


def stop_token_ids(family: ChatFamily, tokens: list[str]) -> list[int]:
    """The ids of every stop token of `family` in the vocabulary `tokens`, EOS first."""
    index = {text: i for i, text in enumerate(tokens)}
    missing = [t for t in family.stop_tokens if t not in index]
    if family.eos_token not in index:
        raise InputError(f"the vocabulary has no {family.eos_token!r}, the EOS of chat family {family.name}")
    ordered = [family.eos_token] + [t for t in family.stop_tokens if t != family.eos_token and t not in missing]
    return [index[t] for t in ordered]


def write_vllm_bundle(folder: Path, family: ChatFamily, model_name: str, num_ctx: int, source: VllmSource,
                      tokens: list[str], bos_id: int | None) -> list[Path]:
    """chat_template.jinja, generation_config.json and serve.sh for vLLM, in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    s = family.sampling
    generation = {"eos_token_id": stop_token_ids(family, tokens), "temperature": s.temperature, "top_p": s.top_p,
                  "top_k": s.top_k, "min_p": s.min_p, "repetition_penalty": s.repeat_penalty,
                  "max_new_tokens": s.max_tokens, "do_sample": True}
    if bos_id is not None:
        generation = {"bos_token_id": bos_id} | generation
    files = {"chat_template.jinja": family.jinja,
             "generation_config.json": json.dumps(generation, indent=2) + "\n",
             "serve.sh": vllm_script(source, model_name, num_ctx, family)}
    for name, text in files.items():
        write_text_atomic(folder / name, text)
    (folder / "serve.sh").chmod(0o755)
    return [folder / name for name in files]


def vllm_script(source: VllmSource, model_name: str, num_ctx: int, family: ChatFamily) -> str:
    lines = ["#!/bin/sh",
             f"# vLLM for the 16-bit weights of {model_name} (chat family {family.name}), written by l3zh-local.",
             "# chat_template.jinja and generation_config.json are beside this script; generation_config.json's",
             "# eos_token_id lists every stop id of the family, and vLLM stops on each of them.",
             'here="$(cd "$(dirname "$0")" && pwd)"']
    model = source.model
    if source.adapter:
        lines += ["# The adapter is merged into the base first (vLLM serves merged weights at full speed).",
                  'merged="$here/merged-hf"',
                  f'[ -d "$merged" ] || l3zh-local merge {shlex.quote(source.model)} {shlex.quote(source.adapter)} '
                  '--out "$merged" || exit 1']
        model = "$merged"
    env = "VLLM_USE_MODELSCOPE=True " if source.modelscope else ""
    args = ["--served-model-name", model_name, "--chat-template", "$here/chat_template.jinja",
            "--generation-config", "$here", "--max-model-len", str(num_ctx), "--host", "127.0.0.1", "--port", "8000"]
    if source.revision and not source.adapter:
        args[0:0] = ["--revision", source.revision]
    quoted_model = '"$merged"' if source.adapter else shlex.quote(model)
    quoted_args = " ".join(f'"{a}"' if a.startswith("$here") else shlex.quote(a) for a in args)
    lines.append(f"exec {env}vllm serve {quoted_model} {quoted_args} \"$@\"")
    lines.append("# Then: l3zh-local verify <the GGUF or the HF folder> --endpoint http://127.0.0.1:8000")
    return "\n".join(lines) + "\n"


def vllm_source(source, adapter: str | None = None) -> VllmSource:
    """Where vLLM should take the weights of an export's `source` (a `sources.ModelSource`) from: the hub id for a
    hub model (portable to the GPU box), the folder's absolute path otherwise."""
    from ..sources import HF_PREFIX, MODELSCOPE_PREFIX

    if adapter and Path(adapter).exists():
        adapter = str(Path(adapter).resolve())
    if source.kind == "huggingface":
        return VllmSource(source.ref.removeprefix(HF_PREFIX), revision=source.revision, adapter=adapter)
    if source.kind == "modelscope":
        return VllmSource(source.ref.removeprefix(MODELSCOPE_PREFIX), revision=source.revision, modelscope=True,
                          adapter=adapter)
    return VllmSource(str(Path(source.path).resolve()), adapter=adapter)
