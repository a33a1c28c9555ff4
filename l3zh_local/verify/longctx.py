"""Long-context probes: does the GGUF treat positions past the trained context as its reference does?

- `long_parity`: the GGUF and its reference (HF folder in fp32, or a 16-bit GGUF) read the same long token sequence;
  their next-token distributions are compared (mean KL divergence, same top token) at the positions past `start`
  only, where a wrong RoPE base or a missing ``rope_freqs`` tensor shows. An HF reference is given the GGUF's
  context length and RoPE base first (context.override_for_gguf), so an export made with ``--ctx/--rope-theta``
  is compared with the HF model under the same config change.
- `passkey`: a number hidden in the middle of filler text is asked for at the end; the greedy answer either holds
  it or not. Run on the GGUF and on the reference, so that a model that cannot retrieve at that length is told
  apart from an export that broke it.

Both work chunk by chunk (512 positions), so memory stays at the model plus its KV cache; they run in the verify
child process (probes.long_probe), and the tests call them directly.
"""

from __future__ import annotations

import inspect
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

CHUNK = 512


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


# -- runners: `logits` yields (positions, their logits rows) chunk by chunk; `greedy` continues a prompt ------------

class GgufRunner:
    def __init__(self, path: str, n_ctx: int, threads: int | None = None):
        from llama_cpp import Llama

        from ..memory import padded_ctx

        self.llm = Llama(model_path=str(path), n_ctx=padded_ctx(n_ctx), n_batch=CHUNK, n_ubatch=CHUNK,
                         n_threads=threads, n_threads_batch=threads, verbose=False)
        self.meta = dict(self.llm.metadata)

    def tokenize(self, text: str) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)

    def bos(self) -> int:
        return self.llm.token_bos()

    def detokenize(self, ids: list[int]) -> str:
        return self.llm.detokenize(ids).decode("utf-8", errors="replace")

    def _decode(self, ids: list[int], n_past: int, keep: list[int] | None = None) -> np.ndarray:
        """Decode `ids` at `n_past`; the logits of the chunk offsets in `keep` (default: the last one)."""
        import llama_cpp

        llm = self.llm
        llm._batch.set_batch(batch=ids, n_past=n_past, logits_all=False)
        keep = keep if keep is not None else [len(ids) - 1]
        flags = llm._batch.batch.logits
        for k in range(len(ids)):
            flags[k] = k in keep
        llm._ctx.decode(llm._batch)
        ptr = llama_cpp.llama_get_logits(llm._ctx.ctx)
        return np.ctypeslib.as_array(ptr, shape=(len(keep), llm.n_vocab())).copy()

    def logits(self, ids: list[int], positions: list[int]) -> Iterator[tuple[list[int], np.ndarray]]:
        self.llm._ctx.kv_cache_clear()
        wanted = set(positions)
        for i in range(0, len(ids), CHUNK):
            chunk = ids[i:i + CHUNK]
            keep = [k for k in range(len(chunk)) if i + k in wanted]
            if keep:
                yield [i + k for k in keep], self._decode(chunk, i, keep)
            else:
                self._decode(chunk, i)

    def greedy(self, ids: list[int], n_new: int) -> list[int]:
        self.llm._ctx.kv_cache_clear()
        last = np.zeros(0)
        for i in range(0, len(ids), CHUNK):
            last = self._decode(ids[i:i + CHUNK], i)[-1]
        out: list[int] = []
        pos = len(ids)
        for _ in range(n_new):
            token = int(np.argmax(last))
            out.append(token)
            last = self._decode([token], pos)[-1]
            pos += 1
        return out


class HfRunner:
    """An HF folder in fp32, with the GGUF's context length and RoPE base when they differ from its config."""

    def __init__(self, path: str, gguf_meta: dict, threads: int | None = None):
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        from ..context import apply_override, override_for_gguf
        from ..files import read_json

        if threads:
            torch.set_num_threads(threads)
        raw = read_json(Path(path) / "config.json")
        self.override = override_for_gguf(raw, gguf_meta)
        config = AutoConfig.for_model(**apply_override(raw, self.override))
        self.model = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=torch.float32,
                                                          attn_implementation="sdpa", use_safetensors=True)
        self.model.eval()

    def _forward(self, ids: list[int], cache) -> tuple[Any, Any]:
        import torch

        # transformers 5 names the KV cache `cache`, 4.x `past_key_values`.
        name = "cache" if "cache" in inspect.signature(self.model.model.forward).parameters else "past_key_values"
        out = self.model.model(input_ids=torch.tensor([ids]), use_cache=True, **{name: cache})
        return out.last_hidden_state[0], getattr(out, name)

    def logits(self, ids: list[int], positions: list[int]) -> Iterator[tuple[list[int], np.ndarray]]:
        import torch

        cache = None
        wanted = set(positions)
        with torch.inference_mode():
            for i in range(0, len(ids), CHUNK):
                hidden, cache = self._forward(ids[i:i + CHUNK], cache)
                keep = [k for k in range(len(hidden)) if i + k in wanted]
                if keep:
                    yield [i + k for k in keep], self.model.lm_head(hidden[keep]).float().numpy()

    def greedy(self, ids: list[int], n_new: int) -> list[int]:
        import torch

        cache, hidden = None, torch.zeros(0)
        with torch.inference_mode():
            for i in range(0, len(ids), CHUNK):
                hidden, cache = self._forward(ids[i:i + CHUNK], cache)
            out: list[int] = []
            for _ in range(n_new):
                token = int(self.model.lm_head(hidden[-1:]).argmax(-1))
                out.append(token)
                hidden, cache = self._forward([token], cache)
        return out


def reference_runner(ref: str, gguf_meta: dict, n_ctx: int, threads: int | None):
    return GgufRunner(ref, n_ctx, threads) if str(ref).endswith(".gguf") else HfRunner(ref, gguf_meta, threads)


# -- parity ------------------------------------------------------------------------------------------------------

def scored_positions(n_tokens: int, start: int, most: int = 2048) -> list[int]:
    """Positions from `start` to the end, evenly thinned to at most `most` (each costs a vocabulary of logits)."""
    stride = max(1, -(-(n_tokens - start) // most))
    return list(range(start, n_tokens, stride))


def long_parity(gguf: GgufRunner, ref, ids: list[int], start: int, *, most: int = 2048) -> dict:
    """Mean KL divergence (reference || GGUF), its worst position and the same-top share at positions >= `start`
    (at most `most` of them, evenly spread)."""
    positions = scored_positions(len(ids), start, most)
    if not positions:
        raise ValueError(f"no positions past {start} in a sequence of {len(ids)} tokens")
    kld_sum, kld_max, same, n = 0.0, 0.0, 0, 0
    for (at_q, q), (at_p, p) in zip(gguf.logits(ids, positions), ref.logits(ids, positions), strict=True):
        assert at_q == at_p and p.shape == q.shape, "the GGUF and the reference disagree on positions or vocabulary"
        lp, lq = _log_softmax(p), _log_softmax(q)
        kld = (np.exp(lp) * (lp - lq)).sum(-1)
        kld_sum += float(kld.sum())
        kld_max = max(kld_max, float(kld.max()))
        same += int((lp.argmax(-1) == lq.argmax(-1)).sum())
        n += len(kld)
    return {"positions": n, "start": start, "tokens": len(ids), "kld_mean": kld_sum / n, "kld_max": kld_max,
            "same_top": same / n}


def random_ids(n: int, *, seed: int = 0, vocab: int = 128000, bos: int | None = None) -> list[int]:
    """`n` ordinary-token ids (below `vocab`, where Llama-3's special tokens begin), BOS first when given."""
    rng = random.Random(seed)
    ids = [rng.randrange(256, vocab) for _ in range(n - (bos is not None))]
    return ([bos] if bos is not None else []) + ids


def text_ids(runner: GgufRunner, n: int) -> list[int]:
    """`n` tokens of the packaged held-out text (Chinese and English, repeated as needed), BOS first."""
    from .. import evaltext

    unit = runner.tokenize("\n\n".join(evaltext.heldout_text(lang) for lang in evaltext.LANGUAGES) + "\n\n")
    ids = [runner.bos()]
    while len(ids) < n:
        ids += unit
    return ids[:n]


# -- pass key ----------------------------------------------------------------------------------------------------

_INTRO = ("There is a secret number hidden in the long text below. Read everything and remember the number: "
          "you will be asked for it at the end.\n\n")
_FILLER = "The hills are quiet. The river keeps flowing. The farmers walk home as the evening light fades. "
_NEEDLE = "\n\nRemember this: the secret number is {key}. The secret number is {key}.\n\n"
_QUESTION = "\n\nWhat is the secret number mentioned in the text above? The secret number is"


def passkey_prompt(runner: GgufRunner, n_tokens: int, *, seed: int = 0, depth: float = 0.5) -> tuple[list[int], str]:
    """Ids of a prompt of about `n_tokens` tokens with a 5-digit number at `depth` of the filler, and the number."""
    key = str(random.Random(seed).randrange(10000, 100000))
    head = [runner.bos()] + runner.tokenize(_INTRO)
    needle = runner.tokenize(_NEEDLE.format(key=key))
    tail = runner.tokenize(_QUESTION)
    unit = runner.tokenize(_FILLER)
    room = max(0, n_tokens - len(head) - len(needle) - len(tail))
    repeats = room // len(unit)
    before = int(repeats * depth)
    ids = head + unit * before + needle + unit * (repeats - before) + tail
    return ids, key


def passkey(runner, ids: list[int], key: str, detokenize, n_new: int = 8) -> dict:
    answer = detokenize(runner.greedy(ids, n_new))
    return {"retrieved": key in answer.replace(" ", ""), "answer": answer.strip()[:40], "key": key,
            "tokens": len(ids)}
