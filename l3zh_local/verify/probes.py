"""The child side of verify: probes that load the GGUF (llama-cpp-python), each run in a fresh Python.

A native abort of llama.cpp (SIGABRT on a broken vocabulary) kills only the child; the parent reports it as a
failed check naming the signal. Request and answer travel as JSON files.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .. import evaltext
from ..prompt import llama_token_text
from .thresholds import UNTRAINED_PPL


def main(request_path: str) -> None:
    """Entry point of the child process: run the probe named in the request file, write the answer file."""
    request = json.loads(Path(request_path).read_text(encoding="utf-8"))
    probes: dict[str, Callable[..., Any]] = {
        "tokenize_probe": tokenize_probe, "reference_probe": reference_probe, "quality_probe": quality_probe,
        "stop_probe": stop_probe, "long_probe": long_probe,
    }
    try:
        payload = {"result": probes[request["probe"]](**request["args"])}
    except Exception as err:  # noqa: BLE001 - reported to the parent as the check's failure
        payload = {"error": f"{type(err).__name__}: {err}"}
    Path(request["answer"]).write_text(json.dumps(payload, ensure_ascii=False), encoding="utf-8")


def _load(gguf: str, **kwargs):
    from llama_cpp import Llama

    return Llama(model_path=gguf, verbose=False, **kwargs)


_SENTINEL = "L3ZH_ASSISTANT_SENTINEL_7"


def tokenize_probe(gguf: str, texts: list[str], chats: list, expected_templates: list[str],
                   token_texts: list[str]) -> dict:
    """(child) The GGUF's ids for `texts`, its metadata, and its renderings of `chats` (and of each expected
    template, tokenized alike)."""
    import llama_cpp

    from .. import prompt

    llm = _load(gguf, vocab_only=True)
    meta = llm.metadata
    ftype = int(meta.get("general.file_type", -1))
    names = {getattr(llama_cpp, n): n[len("LLAMA_FTYPE_MOSTLY_"):].lower()
             for n in dir(llama_cpp) if n.startswith("LLAMA_FTYPE_MOSTLY_")}
    names[0] = "f32"
    bos, eos = llm.token_bos(), llm.token_eos()
    bos_text, eos_text = llama_token_text(llm, bos), llama_token_text(llm, eos)
    vocab = llm._model.vocab

    def tok(text: str, special: bool) -> list[int]:
        return llm.tokenize(text.encode("utf-8"), add_bos=False, special=special)

    out: dict[str, Any] = {
        "plain": [tok(t, False) for t in texts],
        "special": [tok(t, True) for t in texts],
        "with_bos": llm.tokenize(texts[0].encode("utf-8"), add_bos=True, special=False) if texts else [],
        "file_type": names.get(ftype), "bos_id": bos, "eos_id": eos,
        "eos_is_eog": bool(llama_cpp.llama_vocab_is_eog(vocab, eos)),
        "chat_template": meta.get("tokenizer.chat_template"), "render_error": None, "chats": [],
        "turn_end_id": None, "token_text": {str(bos): bos_text, str(eos): eos_text},
        "token_text_ids": {},
    }
    for text in token_texts:
        ids = tok(text, True)
        out["token_text_ids"][text] = ids[0] if len(ids) == 1 else None
    template = out["chat_template"]
    if not template or not chats:
        return out
    try:
        for chat in chats:
            rendered = prompt.render(template, chat, bos_token=bos_text, eos_token=eos_text)
            ids = tok(rendered, True)
            expected_renderings = [prompt.render(t, chat, bos_token=bos_text, eos_token=eos_text)
                                   for t in expected_templates]
            out["chats"].append({
                "rendered": rendered, "ids": ids, "double_bos": ids[:2] == [bos, bos],
                "contents_found": _contents_found(rendered, chat),
                "expected": [{"rendered": text, "ids": tok(text, True)} for text in expected_renderings],
            })
        closing = prompt.render(
            template, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _SENTINEL}],
            add_generation_prompt=False, bos_token=bos_text, eos_token=eos_text)
        after = closing.split(_SENTINEL, 1)[1].lstrip(" ") if _SENTINEL in closing else ""
        after_ids = tok(after, True)
        if after_ids and llama_cpp.llama_vocab_get_attr(vocab, after_ids[0]) & llama_cpp.LLAMA_TOKEN_ATTR_CONTROL:
            out["turn_end_id"] = after_ids[0]
            out["token_text"][str(after_ids[0])] = llama_token_text(llm, after_ids[0])
    except Exception as err:  # noqa: BLE001 - a template that does not render is the finding
        out["render_error"] = str(err)
    return out


def _contents_found(rendered: str, chat: list) -> bool:
    return all((m["content"].strip() in rendered) for m in chat)


def _log_softmax(logits):
    import numpy as np

    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def _eval_chunks(gguf: str, texts: dict, n_ctx: int, max_tokens: int) -> dict[str, list[list[int]]]:
    """The evaluation chunks of each text: BOS + up to n_ctx - 1 tokens of the GGUF's own tokenization."""
    vocab = _load(gguf, vocab_only=True)
    bos = vocab.token_bos()
    chunks: dict[str, list[list[int]]] = {}
    for lang, text in texts.items():
        ids = vocab.tokenize(text.encode("utf-8"), add_bos=False, special=False)[:max_tokens]
        chunks[lang] = [[bos, *ids[i:i + n_ctx - 1]] for i in range(0, len(ids), n_ctx - 1)
                        if len(ids[i:i + n_ctx - 1]) >= 2]
        if not chunks[lang]:
            raise ValueError(f"the {lang} text gave no tokens to evaluate")
    return chunks


def _logits_source(model: str, n_ctx: int, threads: int, like_gguf: str | None = None) -> Callable[[list[int]], Any]:
    """ids -> float32 logits (one row per position) of a GGUF (llama.cpp) or an HF folder (fp32 on CPU; with the
    context length and RoPE base of `like_gguf`, the GGUF being checked, when given)."""
    import numpy as np

    if model.endswith(".gguf"):
        llm = _load(model, n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, logits_all=True, n_threads=threads)

        def gguf_logits(ids: list[int]):
            llm.reset()
            llm.eval(ids)
            return np.array(llm.scores[: len(ids)], dtype=np.float32)

        return gguf_logits
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    config = _hf_config_like(model, _load(like_gguf, vocab_only=True).metadata) if like_gguf else None
    hf = AutoModelForCausalLM.from_pretrained(model, config=config, dtype=torch.float32, use_safetensors=True)
    hf.eval()

    def hf_logits(ids: list[int]):
        with torch.inference_mode():
            return hf(torch.tensor([ids])).logits[0].float().numpy()

    return hf_logits


def reference_probe(gguf: str, ref: str, texts: dict, n_ctx: int, max_tokens: int, threads: int,
                    logprobs_path: str) -> dict:
    """(child, first) Run the reference alone and stream its log-probabilities, row by row, into `logprobs_path`
    (float32, positions x vocabulary), as llama-perplexity's --kl-divergence-base does; the GGUF is loaded after,
    by `quality_probe`, so the two models are never in memory together."""
    import numpy as np

    chunks = _eval_chunks(gguf, texts, n_ctx, max_tokens)
    logits = _logits_source(ref, n_ctx, threads, like_gguf=gguf)
    with open(logprobs_path, "wb") as out:
        for lang_chunks in chunks.values():
            for chunk in lang_chunks:
                # The last position predicts past the chunk: only the chunk's own next tokens are scored.
                p = logits(chunk)[: len(chunk) - 1]
                out.write(_log_softmax(p.astype(np.float64)).astype(np.float32).tobytes())
                vocab_size = p.shape[1]
    return {"chunks": chunks, "vocab_size": vocab_size}


def quality_probe(gguf: str, chunks: dict, vocab_size: int, logprobs_path: str, n_ctx: int, threads: int) -> dict:
    """(child, second) KL divergence, same-top share and perplexities of `gguf` against the reference's
    log-probabilities written by `reference_probe`, per language."""
    import numpy as np

    logits = _logits_source(gguf, n_ctx, threads)
    results = {}
    with open(logprobs_path, "rb") as ref_rows:
        for lang, lang_chunks in chunks.items():
            kld_sum = same = nll_ref = nll_q = 0.0
            positions = 0
            for chunk in lang_chunks:
                q = logits(chunk)[: len(chunk) - 1]
                if q.shape[1] != vocab_size:
                    raise ValueError(f"reference vocabulary {vocab_size} vs GGUF {q.shape[1]}: they differ")
                for rows in range(0, len(q), 64):
                    lq = _log_softmax(q[rows:rows + 64].astype(np.float64))
                    lp = np.fromfile(ref_rows, dtype=np.float32, count=len(lq) * vocab_size).astype(np.float64)
                    lp = lp.reshape(len(lq), vocab_size)
                    kld_sum += float((np.exp(lp) * (lp - lq)).sum())
                    same += int((lp.argmax(-1) == lq.argmax(-1)).sum())
                    targets = np.array(chunk[rows + 1: rows + 1 + len(lq)])
                    nll_ref -= float(lp[np.arange(len(targets)), targets].sum())
                    nll_q -= float(lq[np.arange(len(targets)), targets].sum())
                    positions += len(targets)
            ppl_ref, ppl_q = math.exp(nll_ref / positions), math.exp(nll_q / positions)
            results[lang] = {
                "positions": positions, "kld_mean": kld_sum / positions, "same_top": same / positions,
                "ppl_ref": ppl_ref, "ppl_gguf": ppl_q, "ppl_ratio": ppl_q / ppl_ref,
            }
    return results


def _hf_config_like(ref: str, gguf_meta: dict):
    """The HF reference's config with the GGUF's context length and RoPE base (an export's --ctx/--rope-theta)."""
    from transformers import AutoConfig

    from ..context import apply_override, override_for_gguf
    from ..files import read_json

    raw = read_json(Path(ref) / "config.json")
    return AutoConfig.for_model(**apply_override(raw, override_for_gguf(raw, gguf_meta)))


# A question even a very small model answers in one short sentence (SmolLM2-135M: "The capital of France is Paris.").
STOP_CHAT = [{"role": "user", "content": "What is the capital of France?"}]
FORCED_AFTER = 8  # generated tokens before the forced stop


def stop_probe(gguf: str, mode: str, stop_ids: list[int], max_new_tokens: int, threads: int,
               detect_untrained: bool) -> dict:
    """(child) Greedy reply to a short chat: did it end with an end-of-generation token, and on what text?"""
    import llama_cpp
    import numpy as np

    from .. import prompt

    llm = _load(gguf, n_ctx=512, n_threads=threads, logits_all=detect_untrained)
    vocab = llm._model.vocab
    out: dict[str, Any] = {"mode": mode, "untrained_detected": False}
    if detect_untrained:
        ids = [llm.token_bos()] + llm.tokenize(evaltext.heldout_text("en").encode(), add_bos=False)[:127]
        llm.eval(ids)
        logp = _log_softmax(np.array(llm.scores[: len(ids) - 1], dtype=np.float64))
        out["ppl"] = math.exp(-float(logp[np.arange(len(ids) - 1), ids[1:]].mean()))
        if out["ppl"] > UNTRAINED_PPL:
            mode = out["mode"] = "forced"
            out["untrained_detected"] = True
        llm.reset()
    template = llm.metadata.get("tokenizer.chat_template")
    if not template:
        raise ValueError("the GGUF has no chat template")
    tokens = prompt.ChatPrompt.from_llama(llm).ids(STOP_CHAT)
    forced = stop_ids[0] if stop_ids else llm.token_eos()
    generated: list[int] = []

    def force_stop(input_ids, scores):
        if len(generated) >= FORCED_AFTER:
            scores = np.full_like(scores, -np.inf)
            scores[forced] = 0.0
        return scores

    processors = llama_cpp.LogitsProcessorList([force_stop]) if mode == "forced" else None
    out.update(stopped=False, stop_id=None)
    for token in llm.generate(tokens, temp=0.0, top_k=1, repeat_penalty=1.0, logits_processor=processors):
        if llama_cpp.llama_vocab_is_eog(vocab, token):
            out.update(stopped=True, stop_id=token)
            break
        generated.append(token)
        if len(generated) >= max_new_tokens:
            break
    control = [t for t in generated if llama_cpp.llama_vocab_get_attr(vocab, t) & llama_cpp.LLAMA_TOKEN_ATTR_CONTROL]
    text = llm.detokenize(generated, special=True).decode("utf-8", errors="replace")
    markers = [m for m in ("<|", "|>", "<<SYS>>", "[INST]") if m in text]
    out.update(n_tokens=len(generated), text=text,
               template_text=(llama_token_text(llm, control[0]) if control else (markers[0] if markers else "")))
    return out


def long_probe(gguf: str, ref: str | None, n_tokens: int, start: int, threads: int, passkey: bool) -> dict:
    """(child) Parity past `start` on `n_tokens` of held-out text, and the pass-key probe on GGUF and reference."""
    import gc

    from . import longctx

    runner = longctx.GgufRunner(gguf, n_tokens, threads)
    out: dict[str, Any] = {"n_tokens": n_tokens}
    ids = longctx.text_ids(runner, n_tokens)
    key_ids, key = longctx.passkey_prompt(runner, n_tokens - 16) if passkey else ([], "")
    if passkey:
        out["passkey_gguf"] = longctx.passkey(runner, key_ids, key, runner.detokenize)
    if ref is not None:
        reference = longctx.reference_runner(ref, runner.meta, n_tokens, threads)
        out["override"] = getattr(reference, "override", None) and reference.override.to_dict()
        out["parity"] = longctx.long_parity(runner, reference, ids, start)
        del runner
        gc.collect()
        if passkey:
            out["passkey_ref"] = longctx.passkey(reference, key_ids, key, _detokenizer(gguf))
    return out


def _detokenizer(gguf: str):
    """Text of ids through the GGUF's vocabulary (the reference reads the same ids)."""
    vocab = _load(gguf, vocab_only=True)
    return lambda ids: vocab.detokenize(ids).decode("utf-8", errors="replace")
