"""Verify a running OpenAI-compatible server (l3zh-local serve, llama-server, Ollama's /v1, LM Studio, vLLM)
against the chat family of a GGUF or HF model.

Checks, each a row of the report:
- ``models``: ``GET /v1/models`` answers and lists the model;
- ``context``: the context the server advertises (wherever that server says it) is at least the one expected
  (``--min-ctx``, else the export's manifest beside the GGUF, else the model's recipe);
- ``prompt_tokens``: for a fixed set of chats (Chinese, a system prompt, several turns, an emoji) the server's
  ``usage.prompt_tokens`` equals the token count of the expected rendering: the same template, one BOS, nothing cut;
- ``finish_reason``: every reply ends with ``stop`` (the stop token was honoured), not ``length``;
- ``stop_text``: no reply contains the text of a stop or control token;
- ``stream``: a streamed reply that holds Chinese and emoji has no U+FFFD (no character broken between chunks),
  ends with ``stop``, and its streamed prompt count (when the server sends usage) is the expected one.

Only the standard library speaks HTTP here, so the check runs wherever l3zh-local is installed.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import InputError
from .report import FAIL, PASS, SKIP, WARN, CheckResult, VerifyReport

ENDPOINT_CHECKS = ("models", "context", "prompt_tokens", "finish_reason", "stop_text", "stream")

# Short questions a chat model answers briefly and then stops.
ENDPOINT_CHATS: list[list[dict]] = [
    [{"role": "user", "content": "你好，请用一句话介绍一下你自己。"}],
    [{"role": "system", "content": "请简短回答。"}, {"role": "user", "content": "1+1等于几？"}],
    [{"role": "system", "content": "Answer briefly."},
     {"role": "user", "content": "中国的首都是哪里？"},
     {"role": "assistant", "content": "北京。"},
     {"role": "user", "content": "What is the capital of France? One word."}],
]
# Asks for Chinese and emoji back, whose bytes byte-level tokenizers split across tokens.
STREAM_CHAT: list[dict] = [{"role": "user", "content": "Repeat exactly this text: 你好，世界！🌍🎉"}]


@dataclass(frozen=True)
class Expected:
    """What the server should do, from the reference model: prompt ids per chat, stop texts, context."""

    counts: list[int]
    stream_count: int
    stop_texts: list[str]
    family: str | None
    min_ctx: int | None
    ctx_source: str | None


class _Client:
    def __init__(self, url: str, api_key: str | None, timeout_s: float):
        base = url.rstrip("/")
        self.base = base[: -len("/v1")] if base.endswith("/v1") else base
        self.api_key, self.timeout_s = api_key, timeout_s

    def _request(self, path: str, body: dict | None = None) -> urllib.request.Request:
        headers = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = json.dumps(body).encode("utf-8") if body is not None else None
        return urllib.request.Request(self.base + path, data=data, headers=headers,
                                      method="POST" if body is not None else "GET")

    def json(self, path: str, body: dict | None = None) -> Any:
        try:
            with urllib.request.urlopen(self._request(path, body), timeout=self.timeout_s) as response:
                return json.loads(response.read().decode("utf-8"))
        except urllib.error.HTTPError as err:
            detail = err.read().decode("utf-8", errors="replace")[:300]
            raise RuntimeError(f"HTTP {err.code} from {path}: {detail}") from None
        except (urllib.error.URLError, OSError) as err:
            reason = getattr(err, "reason", err)
            raise RuntimeError(f"cannot reach {self.base}{path}: {reason}") from None

    def stream(self, path: str, body: dict) -> list[dict]:
        """The JSON events of a server-sent-event stream, in order ([DONE] left out)."""
        events = []
        try:
            with urllib.request.urlopen(self._request(path, body), timeout=self.timeout_s) as response:
                for raw in response:
                    line = raw.decode("utf-8").strip()  # a line is whole: UTF-8 is decoded per line, not per read
                    if line.startswith("data:") and line[5:].strip() != "[DONE]":
                        events.append(json.loads(line[5:]))
        except urllib.error.HTTPError as err:
            detail = err.read().decode("utf-8", errors="replace")[:300]
            raise RuntimeError(f"HTTP {err.code} from {path}: {detail}") from None
        except (urllib.error.URLError, OSError) as err:
            raise RuntimeError(f"stream from {self.base}{path} failed: {getattr(err, 'reason', err)}") from None
        return events


def expected_from(reference: Path, min_ctx: int | None = None) -> Expected:
    """Prompt counts and stop texts the reference model's family gives, and the context to expect."""
    from ..prompt import ChatPrompt

    reference = Path(reference)
    if reference.is_file():
        import llama_cpp

        from ..chat import _silence_llama_log, gguf_family
        from ..prompt import llama_control_tokens

        _silence_llama_log()
        try:
            llm = llama_cpp.Llama(model_path=str(reference), vocab_only=True, verbose=False)
        except (ValueError, RuntimeError) as err:
            raise InputError(f"cannot load {reference}: {err}") from None
        family = gguf_family(llm)
        chat_prompt = ChatPrompt.from_llama(llm, family.jinja if family else None)
        controls = list(llama_control_tokens(llm))
    elif reference.is_dir():
        from transformers import AutoTokenizer

        from .. import convert, recipes, templates

        tokenizer = AutoTokenizer.from_pretrained(str(reference))
        recipe = recipes.find_recipe(reference.name)
        family = templates.detect_family(convert.existing_chat_template(reference),
                                         recipe.family_name if recipe else None)
        chat_prompt = ChatPrompt.from_hf(tokenizer, family.jinja)
        controls = list(chat_prompt.control_tokens)
    else:
        raise InputError(f"no GGUF or HF model folder at {reference}")
    stop_texts = sorted(set(family.stop_tokens if family else ()) | set(controls))
    ctx, source = _expected_ctx(reference, min_ctx)
    return Expected(counts=[len(chat_prompt.ids(chat)) for chat in ENDPOINT_CHATS],
                    stream_count=len(chat_prompt.ids(STREAM_CHAT)), stop_texts=stop_texts,
                    family=family.name if family else None, min_ctx=ctx, ctx_source=source)


def _expected_ctx(reference: Path, min_ctx: int | None) -> tuple[int | None, str | None]:
    if min_ctx:
        return min_ctx, "--min-ctx"
    from .. import recipes
    from ..files import read_json

    manifest = reference.parent / "manifest.json" if reference.is_file() else reference / "manifest.json"
    if manifest.is_file():
        try:
            num_ctx = read_json(manifest).get("settings", {}).get("num_ctx")
        except Exception:  # noqa: BLE001 - a manifest we cannot read just gives no expectation
            num_ctx = None
        if num_ctx:
            return int(num_ctx), manifest.name
    stem = reference.name.split(".")[0]
    recipe = recipes.find_recipe(stem)
    return (recipe.num_ctx, f"recipe {recipe.name}") if recipe else (None, None)


def advertised_context(client: _Client, model: str) -> tuple[int | None, str]:
    """The serving context the server advertises, from whichever endpoint that kind of server has."""
    probes = [
        ("/v1/models", lambda d: next((m.get("max_model_len") or (m.get("meta") or {}).get("n_ctx")
                                       for m in d.get("data", []) if m.get("id") == model), None)),  # vLLM, ours
        ("/props", lambda d: (d.get("default_generation_settings") or {}).get("n_ctx")),  # llama-server
        (f"/api/v0/models/{urllib.parse.quote(model, safe='')}",
         lambda d: d.get("loaded_context_length")),  # LM Studio
        ("/api/ps", lambda d: next((m.get("context_length") for m in d.get("models", [])
                                    if m.get("name") == model or m.get("model") == model), None)),  # Ollama
    ]
    for path, read in probes:
        try:
            value = read(client.json(path))
        except (RuntimeError, ValueError, AttributeError, TypeError):
            continue
        if isinstance(value, int) and value > 0:
            return value, path
    return None, "none of /v1/models, /props, /api/v0/models, /api/ps says"


def verify_endpoint(url: str, reference: str | Path, *, model: str | None = None, api_key: str | None = None,
                    min_ctx: int | None = None, max_tokens: int = 200, timeout_s: float = 300) -> VerifyReport:
    """Check the OpenAI-compatible server at `url` against the family of `reference` (GGUF or HF folder).

    Returns the report (never raises for a failed check); InputError when the reference cannot be read.
    """
    expected = expected_from(Path(reference), min_ctx)
    client = _Client(url, api_key, timeout_s)
    report = VerifyReport(gguf=url, ref=str(reference), quant_type=None)

    def add(name: str, status: str, message: str, **figures) -> None:
        report.checks.append(CheckResult(name, status, message, figures))

    try:
        listed = [m.get("id") for m in client.json("/v1/models").get("data", [])]
    except (RuntimeError, ValueError, AttributeError) as err:
        add("models", FAIL, str(err))
        for name in ENDPOINT_CHECKS[1:]:
            add(name, SKIP, "the server did not answer /v1/models")
        return report
    if model is None:
        if len(listed) != 1:
            add("models", FAIL, f"the server lists {len(listed)} models ({', '.join(map(str, listed))}): pass "
                                "--model NAME")
            for name in ENDPOINT_CHECKS[1:]:
                add(name, SKIP, "no model chosen")
            return report
        model = listed[0]
    if model in listed:
        add("models", PASS, f"serves {model}", listed=listed)
    else:
        add("models", WARN, f"{model} is not in /v1/models ({', '.join(map(str, listed))}); asking for it anyway",
            listed=listed)

    ctx, where = advertised_context(client, model)
    if expected.min_ctx is None:
        add("context", WARN if ctx is None else PASS,
            f"advertised {ctx} tokens ({where}); nothing to compare with (pass --min-ctx)", advertised=ctx)
    elif ctx is None:
        add("context", WARN, f"the server does not advertise its context ({where}); expected at least "
                             f"{expected.min_ctx} ({expected.ctx_source})")
    else:
        ok = ctx >= expected.min_ctx
        add("context", PASS if ok else FAIL,
            f"advertised {ctx} tokens ({where}) {'>=' if ok else '<'} {expected.min_ctx} ({expected.ctx_source})",
            advertised=ctx, expected=expected.min_ctx)

    replies: list[dict] = []
    errors: list[str] = []
    for i, chat in enumerate(ENDPOINT_CHATS):
        body = {"model": model, "messages": chat, "temperature": 0, "max_tokens": max_tokens}
        try:
            answer = client.json("/v1/chat/completions", body)
            choice = answer["choices"][0]
            replies.append({"chat": i, "prompt_tokens": (answer.get("usage") or {}).get("prompt_tokens"),
                            "finish_reason": choice.get("finish_reason"),
                            "content": (choice.get("message") or {}).get("content") or ""})
        except (RuntimeError, KeyError, IndexError, TypeError, ValueError) as err:
            errors.append(f"chat {i}: {err}")
    if errors:
        for name in ("prompt_tokens", "finish_reason", "stop_text"):
            add(name, FAIL, "; ".join(errors)[:400])
    else:
        wrong = [f"chat {r['chat']}: {r['prompt_tokens']} != {expected.counts[r['chat']]}" for r in replies
                 if r["prompt_tokens"] != expected.counts[r["chat"]]]
        counts = [r["prompt_tokens"] for r in replies]
        add("prompt_tokens", FAIL if wrong else PASS,
            ("prompt token counts differ from the " + (expected.family or "expected") + " rendering: "
             + "; ".join(wrong) + " (wrong template, double BOS, or the prompt cut)") if wrong
            else f"{len(replies)} chats: {counts} tokens, as the {expected.family or 'reference'} template renders "
                 "them", counts=counts, expected=expected.counts)
        reasons = [r["finish_reason"] for r in replies]
        add("finish_reason", PASS if all(r == "stop" for r in reasons) else FAIL,
            f"finish_reason {reasons}" + ("" if all(r == "stop" for r in reasons)
                                          else f": a reply ran to max_tokens={max_tokens} without its stop token"),
            reasons=reasons)
        leaked = sorted({t for r in replies for t in expected.stop_texts if t in r["content"]})
        add("stop_text", FAIL if leaked else PASS,
            f"replies contain stop-token text {leaked}" if leaked else "no stop or control token text in replies",
            leaked=leaked)

    try:
        events = client.stream("/v1/chat/completions", {
            "model": model, "messages": STREAM_CHAT, "temperature": 0, "max_tokens": max_tokens, "stream": True,
            "stream_options": {"include_usage": True}})
        pieces = [((c.get("delta") or {}).get("content") or "") for e in events for c in e.get("choices") or []]
        finish = next((c.get("finish_reason") for e in events for c in e.get("choices") or []
                       if c.get("finish_reason")), None)
        usage = next((e["usage"] for e in events if e.get("usage")), None)
        text = "".join(pieces)
        problems = []
        if "\ufffd" in text:
            problems.append(f"U+FFFD in the streamed text ({sum(p.count(chr(0xfffd)) for p in pieces)} times): "
                            "a character was broken between chunks")
        if finish != "stop":
            problems.append(f"finish_reason {finish}")
        if usage and usage.get("prompt_tokens") != expected.stream_count:
            problems.append(f"streamed prompt_tokens {usage.get('prompt_tokens')} != {expected.stream_count}")
        if not text:
            problems.append("no text streamed")
        add("stream", FAIL if problems else PASS,
            "; ".join(problems) if problems else f"{len(pieces)} chunks, {len(text)} characters, no broken "
                                                 f"character, finish_reason stop", chunks=len(pieces), text=text)
    except (RuntimeError, ValueError) as err:
        add("stream", FAIL, str(err))
    return report
