"""Verify an exported GGUF against the model it came from.

Checks, each a row of the report:
- ``tokenizer``: the GGUF's tokenizer (llama-cpp-python) gives the reference tokenizer's ids on the packaged
  multilingual text set, with and without parsing of special tokens, and adds BOS the same way;
- ``template``: the GGUF's own ``tokenizer.chat_template`` renders sample chats in jinja2's sandbox, holds one BOS,
  and gives token for token the expected rendering (when an expected template or family is given);
- ``eos``: the GGUF's EOS id is the expected stop token (when given) and the token the template ends an assistant
  turn with, and the runtime treats it as end of generation;
- ``quality``: mean KL divergence, share of positions with the same top token and perplexity ratio of the GGUF
  against the reference (HF model in fp32 on CPU, or a 16-bit GGUF in the same runtime) on held-out Chinese and
  English text, judged by per-quant-type thresholds;
- ``stop``: a short greedy chat ends with a stop token within a bounded number of tokens and emits no template
  text (on an untrained model the stop is forced through the logits instead, and the report says so).

Everything that loads the GGUF runs in a child process (``python -c``), so a native abort of llama.cpp (SIGABRT on
a broken vocabulary) becomes a failed check naming the signal, never a dead CLI.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from . import evaltext
from .hardware import physical_cores
from .errors import InputError

PASS, FAIL, SKIP = "pass", "fail", "skip"
ALL_CHECKS = ("tokenizer", "template", "eos", "quality", "stop")

# ---------------------------------------------------------------------------------------------------------------
# Thresholds
# ---------------------------------------------------------------------------------------------------------------

# llama.cpp's Llama-3-8B scoreboard (tools/perplexity README, wikitext-2, against F16): mean KLD, same-top share.
PUBLISHED_LLAMA3_8B: dict[str, tuple[float, float | None]] = {
    "q8_0": (0.00136, 0.977),
    "q6_k": (0.00545, 0.960),
    "q5_k_m": (0.0108, None),
    "q4_k_m": (0.0313, 0.919),
    "iq4_xs": (0.0363, None),
    "q3_k_m": (0.102, None),
    "q2_k": (0.445, 0.711),
}
# Types the scoreboard does not list borrow a neighbour's figure, scaled up (looser) by the factor given.
STAND_INS: dict[str, tuple[str, float]] = {
    "q5_k_s": ("q5_k_m", 1.5), "q5_1": ("q5_k_m", 1.5), "q5_0": ("q5_k_m", 2.0),
    "q4_k_s": ("q4_k_m", 1.3), "iq4_nl": ("iq4_xs", 1.0), "q4_1": ("q4_k_m", 1.8), "q4_0": ("q4_k_m", 2.0),
    "q3_k_l": ("q3_k_m", 0.9), "q3_k_s": ("q3_k_m", 1.5), "q2_k_s": ("q2_k", 1.2),
}
SIXTEEN_BIT = ("f32", "f16", "bf16")
# Small models lose more to quantization than an 8B one (SmolLM2-135M q4_k_m: KLD 0.079 against 8B's 0.031;
# q8_0 against HF fp32: 0.0071 against 8B's 0.00136), so the published figures are multiplied by these margins,
# and KLD_FLOOR allows for the runtime's own arithmetic (f16 activations) when the reference is HF fp32.
KLD_MARGIN = 4.0
KLD_FLOOR = 0.002
TOP_MISS_MARGIN = 4.0


@dataclass(frozen=True)
class QualityThreshold:
    """Pass limits of the quality check, per language."""

    max_kld: float
    min_same_top: float
    max_ppl_ratio: float
    basis: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def default_threshold(quant_type: str) -> QualityThreshold:
    """Threshold for `quant_type` drawn from llama.cpp's Llama-3-8B figures with margin (see module constants)."""
    qtype = quant_type.lower()
    if qtype in SIXTEEN_BIT:
        return QualityThreshold(1e-3, 0.95, 1.01, f"{qtype}: numerically the reference")
    if qtype in PUBLISHED_LLAMA3_8B:
        kld, same_top = PUBLISHED_LLAMA3_8B[qtype]
        basis = f"llama.cpp Llama-3-8B {qtype} KLD {kld}"
    elif qtype in STAND_INS:
        neighbour, factor = STAND_INS[qtype]
        kld = PUBLISHED_LLAMA3_8B[neighbour][0] * factor
        same_top = None
        basis = f"{qtype} not published: {neighbour} KLD x{factor}"
    else:
        raise InputError(f"no quality threshold for quant type {quant_type}; pass thresholds explicitly")
    # Where the same-top share is not published, the published points follow miss ~= 0.45 * sqrt(KLD).
    miss = 1.0 - same_top if same_top is not None else 0.45 * math.sqrt(kld)
    max_kld = kld * KLD_MARGIN + KLD_FLOOR
    return QualityThreshold(
        max_kld=round(max_kld, 6),
        min_same_top=round(max(0.0, 1.0 - TOP_MISS_MARGIN * miss), 4),
        max_ppl_ratio=round(1.0 + max_kld + 0.02, 4),
        basis=f"{basis}, margin x{KLD_MARGIN} + {KLD_FLOOR} (KLD) / x{TOP_MISS_MARGIN} (top misses)",
    )


# ---------------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class CheckResult:
    """One check: its status (pass, fail, skip), a one-line message and the figures behind it."""

    name: str
    status: str
    message: str
    figures: dict[str, Any] = field(default_factory=dict)


@dataclass
class VerifyReport:
    gguf: str
    ref: str | None
    quant_type: str | None
    checks: list[CheckResult] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(check.status != FAIL for check in self.checks)

    def check(self, name: str) -> CheckResult:
        return next(c for c in self.checks if c.name == name)

    def failures(self) -> list[CheckResult]:
        return [c for c in self.checks if c.status == FAIL]

    def to_dict(self) -> dict:
        """Plain JSON-able form, for the manifest."""
        return {
            "gguf": self.gguf, "ref": self.ref, "quant_type": self.quant_type, "passed": self.passed,
            "checks": [asdict(c) for c in self.checks],
        }

    def table(self) -> str:
        """The report as a text table: one row per check, then the quality figures per language."""
        rows = [("check", "result", "details")] + [(c.name, c.status.upper(), c.message) for c in self.checks]
        width = [max(len(r[i]) for r in rows) for i in range(2)]
        lines = [f"{r[0]:<{width[0]}}  {r[1]:<{width[1]}}  {r[2]}" for r in rows]
        lines.insert(1, "-" * (width[0] + width[1] + 4 + max(len(r[2]) for r in rows)))
        quality = next((c for c in self.checks if c.name == "quality" and c.figures.get("languages")), None)
        if quality:
            lines += ["", "lang  positions  mean KLD   same top  PPL ref     PPL gguf    PPL ratio"]
            for lang, f in quality.figures["languages"].items():
                lines.append(
                    f"{lang:<4}  {f['positions']:>9}  {f['kld_mean']:<9.5f}  {f['same_top']:>7.1%}  "
                    f"{f['ppl_ref']:<10.4g}  {f['ppl_gguf']:<10.4g}  {f['ppl_ratio']:.4f}"
                )
        verdict = "PASSED" if self.passed else "FAILED: " + ", ".join(c.name for c in self.failures())
        return "\n".join(lines + ["", f"verify {verdict}"])


# ---------------------------------------------------------------------------------------------------------------
# Sample chats for the template check
# ---------------------------------------------------------------------------------------------------------------

SAMPLE_CHATS: list[list[dict]] = [
    [{"role": "user", "content": "你好，请介绍一下你自己。"}],
    [{"role": "system", "content": "你是一个乐于助人的助手。"}, {"role": "user", "content": "What is 2+2?"}],
    [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "中国的首都是哪里？"},
        {"role": "assistant", "content": "北京。"},
        {"role": "user", "content": "那日本呢？🗾"},
    ],
    [{"role": "user", "content": "  leading and trailing spaces  "}],
]
_SENTINEL = "L3ZH_ASSISTANT_SENTINEL_7"


# ---------------------------------------------------------------------------------------------------------------
# The main entry point
# ---------------------------------------------------------------------------------------------------------------


def verify_gguf(
    gguf: Path,
    *,
    ref: Path | None = None,
    quant_type: str | None = None,
    family: str | None = None,
    expected_template: str | None = None,
    expected_eos: str | int | None = None,
    stop_tokens: list[int] | None = None,
    thresholds: QualityThreshold | None = None,
    stop_mode: str = "auto",
    max_new_tokens: int = 64,
    n_ctx: int = 512,
    max_eval_tokens: int = 1024,
    threads: int | None = None,
    timeout_s: float = 1800,
    checks: Sequence[str] = ALL_CHECKS,
) -> VerifyReport:
    """Run every check on `gguf` and return the report (never raises for a failed check).

    ref: the HF folder the GGUF came from, or a 16-bit GGUF of it; without it tokenizer parity and quality are
    skipped. quant_type: names the threshold row (read from the GGUF when None). family: a chat family of the
    template registry, giving the expected template, EOS and stop tokens; expected_template / expected_eos give them
    directly. stop_mode: "natural", "forced" (stop token forced through the logits), "auto" (natural unless the
    model is untrained) or "skip". checks: which of ALL_CHECKS to run.
    """
    gguf = Path(gguf)
    if not gguf.is_file():
        raise InputError(f"no GGUF file at {gguf}")
    if ref is not None:
        ref = Path(ref)
        if not ref.exists():
            raise InputError(f"no reference model at {ref}: give an HF folder or a 16-bit GGUF")
    unknown = set(checks) - set(ALL_CHECKS)
    if unknown:
        raise InputError(f"unknown check {', '.join(sorted(unknown))}: choose from {', '.join(ALL_CHECKS)}")
    if stop_mode not in ("auto", "natural", "forced", "skip"):
        raise InputError(f"unknown stop mode {stop_mode}: choose auto, natural, forced or skip")
    stop_texts: list[str] = []
    if family is not None:
        expected_template, expected_eos, stop_texts = _from_family(family, expected_template, expected_eos)
    threads = threads or physical_cores()

    expected_ids = [expected_eos] if isinstance(expected_eos, int) else []
    eos_texts = [expected_eos] if isinstance(expected_eos, str) else []
    probe_args = {
        "gguf": str(gguf), "texts": [c.text for c in evaltext.tokenizer_cases()], "chats": SAMPLE_CHATS,
        "expected_template": expected_template, "token_texts": eos_texts + stop_texts,
    }
    probe, crash = _isolated("tokenize_probe", probe_args, timeout_s)
    report = VerifyReport(gguf=str(gguf), ref=str(ref) if ref else None, quant_type=None)
    if crash:
        for name in ("tokenizer", "template", "eos"):
            if name in checks:
                report.checks.append(CheckResult(name, FAIL, f"the GGUF could not be loaded: {crash}"))
    else:
        if "tokenizer" in checks:
            report.checks.append(_tokenizer_check(probe, ref, timeout_s))
        if "template" in checks:
            report.checks.append(_template_check(probe, expected_template))
        if "eos" in checks:
            report.checks.append(_eos_check(probe, expected_eos))
        # The EOS first (the stop check forces it on untrained models), then the family's other stop tokens.
        expected_ids += [probe["token_text_ids"].get(text) for text in eos_texts + stop_texts]
    report.quant_type = quant_type or (probe or {}).get("file_type")

    if crash:  # nothing else can load it either
        for name in ("quality", "stop"):
            if name in checks:
                report.checks.append(CheckResult(name, FAIL, f"the GGUF could not be loaded: {crash}"))
        return report
    untrained = None
    if "quality" in checks:
        quality = _quality_check(gguf, ref, report.quant_type, thresholds, n_ctx, max_eval_tokens, threads, timeout_s)
        report.checks.append(quality)
        if quality.figures.get("languages"):
            untrained = max(f["ppl_gguf"] for f in quality.figures["languages"].values()) > UNTRAINED_PPL
    if "stop" in checks:
        stop_ids = list(dict.fromkeys(i for i in (stop_tokens or expected_ids) if i is not None))
        report.checks.append(_stop_check(gguf, stop_mode, stop_ids, max_new_tokens, untrained, threads, timeout_s))
    return report


UNTRAINED_KLD_FACTOR = 2.0
UNTRAINED_PPL = 1000.0  # a trained model's perplexity on ordinary prose is far below this; a random one's is ~vocab


def _from_family(family: str, expected_template, expected_eos) -> tuple[str, str | int, list[str]]:
    """Expected template, EOS and stop-token texts from the template registry (explicit arguments win)."""
    from .templates import get_family

    fam = get_family(family)
    return (
        expected_template if expected_template is not None else fam.jinja,
        expected_eos if expected_eos is not None else fam.eos_token,
        list(fam.stop_tokens),
    )


# ---------------------------------------------------------------------------------------------------------------
# Checks (run in the parent, on what the child probes returned)
# ---------------------------------------------------------------------------------------------------------------


def _tokenizer_check(probe: dict, ref: Path | None, timeout_s: float) -> CheckResult:
    if ref is None:
        return CheckResult("tokenizer", SKIP, "no reference given")
    cases = evaltext.tokenizer_cases()
    texts = [c.text for c in cases]
    if ref.suffix == ".gguf":
        ref_probe, crash = _isolated(
            "tokenize_probe", {"gguf": str(ref), "texts": texts, "chats": [], "expected_template": None,
                               "token_texts": []}, timeout_s)
        if crash:
            return CheckResult("tokenizer", FAIL, f"the reference GGUF could not be loaded: {crash}")
        ref_ids = {"plain": ref_probe["plain"], "special": ref_probe["special"], "with_bos": ref_probe["with_bos"]}
    else:
        ref_ids = _hf_token_ids(ref, texts)
    mismatches = []
    for mode in ("plain", "special"):
        for case, mine, theirs in zip(cases, probe[mode], ref_ids[mode]):
            if mine != theirs:
                mismatches.append(f"{case.kind}/{mode} {case.text[:24]!r}: gguf {_diff(mine, theirs)}")
    if probe["with_bos"] != ref_ids["with_bos"]:
        mismatches.append(f"BOS handling: gguf {probe['with_bos'][:3]} vs ref {ref_ids['with_bos'][:3]}")
    total = 2 * len(cases) + 1
    figures = {"cases": total, "mismatches": len(mismatches), "examples": mismatches[:5]}
    if mismatches:
        return CheckResult("tokenizer", FAIL, f"{len(mismatches)}/{total} texts tokenize differently; first: "
                           f"{mismatches[0]}", figures)
    return CheckResult("tokenizer", PASS, f"{total}/{total} texts give identical ids", figures)


def _diff(mine: list[int], theirs: list[int]) -> str:
    at = next((i for i, (a, b) in enumerate(zip(mine, theirs)) if a != b), min(len(mine), len(theirs)))
    return f"{mine[at:at + 4]} vs ref {theirs[at:at + 4]} at token {at} ({len(mine)} vs {len(theirs)} tokens)"


def _hf_token_ids(ref: Path, texts: list[str]) -> dict:
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(ref), trust_remote_code=False)
    except Exception as err:  # noqa: BLE001 - any failure here is a bad reference folder
        raise InputError(f"cannot load the reference tokenizer from {ref}: {err}") from None
    plain = [tok(t, add_special_tokens=False, split_special_tokens=True)["input_ids"] for t in texts]
    special = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    return {"plain": plain, "special": special, "with_bos": tok(texts[0])["input_ids"]}


def _template_check(probe: dict, expected_template: str | None) -> CheckResult:
    if not probe["chat_template"]:
        return CheckResult("template", FAIL, "the GGUF has no tokenizer.chat_template")
    if probe["render_error"]:
        return CheckResult("template", FAIL, f"the GGUF's chat template fails: {probe['render_error']}")
    problems = []
    for i, chat in enumerate(probe["chats"]):
        if chat["double_bos"]:
            problems.append(f"chat {i}: the rendered prompt starts with two BOS tokens")
        if not chat["contents_found"]:
            problems.append(f"chat {i}: a message's text is missing from the rendering")
        if expected_template is not None and chat["ids"] != chat["expected_ids"]:
            problems.append(
                f"chat {i}: differs from the expected template at token {_first_diff(chat['ids'], chat['expected_ids'])}"
                f": gguf {chat['rendered'][:60]!r} vs expected {chat['expected_rendered'][:60]!r}"
            )
    figures = {"chats": len(probe["chats"]), "problems": problems[:5],
               "compared_with_expected": expected_template is not None}
    if problems:
        return CheckResult("template", FAIL, f"{len(problems)} problem(s); first: {problems[0]}", figures)
    if expected_template is None:
        return CheckResult("template", PASS, f"{len(probe['chats'])} chats render (no expected template given)",
                           figures)
    return CheckResult("template", PASS, f"{len(probe['chats'])} chats give the expected ids", figures)


def _first_diff(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def _eos_check(probe: dict, expected_eos: str | int | None) -> CheckResult:
    eos, texts = probe["eos_id"], probe["token_text"]
    figures = {"eos_id": eos, "eos_text": texts.get(str(eos)), "turn_end_id": probe["turn_end_id"],
               "eos_is_eog": probe["eos_is_eog"]}
    if expected_eos is not None:
        want = expected_eos if isinstance(expected_eos, int) else probe["token_text_ids"].get(expected_eos)
        figures["expected_id"] = want
        if want is None:
            return CheckResult("eos", FAIL, f"expected stop token {expected_eos!r} is not in the GGUF's vocabulary",
                               figures)
        if eos != want:
            return CheckResult("eos", FAIL, f"EOS is {eos} {texts.get(str(eos))!r}, expected {want} {expected_eos!r}",
                               figures)
    if probe["turn_end_id"] is not None and probe["turn_end_id"] != eos:
        turn_end = probe["turn_end_id"]
        return CheckResult(
            "eos", FAIL, f"the template ends an assistant turn with {turn_end} {texts.get(str(turn_end))!r} but "
            f"EOS is {eos} {texts.get(str(eos))!r}", figures)
    if not probe["eos_is_eog"]:
        return CheckResult("eos", FAIL, f"the runtime does not stop at EOS {eos}", figures)
    basis = "expected token and template turn end" if expected_eos is not None else "template turn end"
    return CheckResult("eos", PASS, f"EOS {eos} {texts.get(str(eos))!r} matches the {basis}", figures)


def _quality_check(gguf, ref, quant_type, thresholds, n_ctx, max_eval_tokens, threads, timeout_s) -> CheckResult:
    if ref is None:
        return CheckResult("quality", SKIP, "no reference given")
    if thresholds is None:
        if quant_type is None:
            return CheckResult("quality", SKIP, "unknown quant type and no thresholds given")
        thresholds = default_threshold(quant_type)
    if ref.suffix != ".gguf":
        _check_fp32_fits(ref)
    args = {
        "gguf": str(gguf), "ref": str(ref), "texts": {lang: evaltext.heldout_text(lang) for lang in evaltext.LANGUAGES},
        "n_ctx": n_ctx, "max_tokens": max_eval_tokens, "threads": threads,
    }
    result, crash = _isolated("quality_probe", args, timeout_s)
    if crash:
        return CheckResult("quality", FAIL, f"evaluation failed: {crash}", {"thresholds": thresholds.to_dict()})
    problems, notes = [], []
    # On an untrained model the top two logits are near ties everywhere, so which one wins is noise: the
    # same-top share is reported but not judged there (KL divergence and perplexity still are).
    untrained = max(f["ppl_ref"] for f in result.values()) > UNTRAINED_PPL
    max_kld = thresholds.max_kld
    if untrained:
        notes.append(f"untrained reference (PPL > {UNTRAINED_PPL:g}): same-top share not judged")
        if quant_type not in SIXTEEN_BIT:
            # Random weights have none of the structure quantizers exploit: measured on the tiny fixture, their
            # KLD runs 1 to 4.5 times llama.cpp's published trained-model figures (benchmarks/results).
            max_kld = round(max_kld * UNTRAINED_KLD_FACTOR, 6)
            notes.append(f"KLD limit x{UNTRAINED_KLD_FACTOR} for random weights")
    for lang, f in result.items():
        if f["kld_mean"] > max_kld:
            problems.append(f"{lang} mean KLD {f['kld_mean']:.5f} > {max_kld} "
                            f"(x{f['kld_mean'] / max_kld:.2f})")
        if f["same_top"] < thresholds.min_same_top and not untrained:
            problems.append(f"{lang} same top {f['same_top']:.1%} < {thresholds.min_same_top:.1%} "
                            f"({(thresholds.min_same_top - f['same_top']) * 100:.1f} points short)")
        if f["ppl_ratio"] > thresholds.max_ppl_ratio:
            problems.append(f"{lang} PPL ratio {f['ppl_ratio']:.4f} > {thresholds.max_ppl_ratio}")
    figures = {"languages": result, "thresholds": thresholds.to_dict(), "same_top_judged": not untrained}
    summary = "; ".join([f"{lang} KLD {f['kld_mean']:.4g} top {f['same_top']:.1%} PPLx{f['ppl_ratio']:.3f}"
                         for lang, f in result.items()] + notes)
    if problems:
        return CheckResult("quality", FAIL, "; ".join(problems), figures)
    return CheckResult("quality", PASS, summary, figures)


def _check_fp32_fits(ref: Path) -> None:
    """An HF reference runs in fp32: refuse early, pointing to the 16-bit GGUF, when that cannot fit in memory."""
    from .hfmodel import inspect_model

    need = inspect_model(ref).n_params * 4
    free = _available_memory()
    if free is not None and need > free:
        raise InputError(f"the HF reference needs about {need / 2**30:.1f} GiB in fp32 but {free / 2**30:.1f} GiB "
                         "is free: pass its 16-bit GGUF as --ref instead")


def _available_memory() -> int | None:
    """Bytes of memory available to a new process (Linux MemAvailable), or None where not knowable."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _stop_check(gguf, stop_mode, stop_ids, max_new_tokens, untrained, threads, timeout_s) -> CheckResult:
    if stop_mode == "skip":
        return CheckResult("stop", SKIP, "skipped on request")
    mode, reason = stop_mode, ""
    if stop_mode == "auto":
        mode = "forced" if untrained else "natural"
        if untrained:
            reason = f"untrained model (PPL > {UNTRAINED_PPL:g}): stop forced through the logits; "
    args = {"gguf": str(gguf), "mode": mode, "stop_ids": stop_ids, "max_new_tokens": max_new_tokens,
            "threads": threads, "detect_untrained": stop_mode == "auto" and untrained is None}
    result, crash = _isolated("stop_probe", args, timeout_s)
    if crash:
        return CheckResult("stop", FAIL, f"generation failed: {crash}")
    if result.get("untrained_detected"):
        reason = f"untrained model (PPL {result['ppl']:.0f}): stop forced through the logits; "
    figures = {k: v for k, v in result.items()}
    mode = result["mode"]
    if not result["stopped"]:
        return CheckResult("stop", FAIL, f"{reason}no stop token within {max_new_tokens} tokens", figures)
    if result["template_text"]:
        return CheckResult("stop", FAIL, f"{reason}the reply contains template text {result['template_text']!r}",
                           figures)
    if stop_ids and result["stop_id"] not in stop_ids:
        return CheckResult("stop", FAIL, f"{reason}stopped on {result['stop_id']}, expected one of {stop_ids}",
                           figures)
    return CheckResult("stop", PASS, f"{reason}{mode} stop on {result['stop_id']} after {result['n_tokens']} tokens",
                       figures)


# ---------------------------------------------------------------------------------------------------------------
# Child processes
# ---------------------------------------------------------------------------------------------------------------


def _isolated(probe: str, args: dict, timeout_s: float) -> tuple[Any, str | None]:
    """Run probe `probe` in a fresh Python; return (result, None) or (None, why it died)."""
    package_parent = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_parent, env.get("PYTHONPATH")) if p)
    with tempfile.TemporaryDirectory(prefix="l3zh-verify-") as tmp:
        request, answer = Path(tmp) / "request.json", Path(tmp) / "answer.json"
        request.write_text(json.dumps({"probe": probe, "args": args, "answer": str(answer)}), encoding="utf-8")
        code = "import sys; from l3zh_local.verify import _probe_main; _probe_main(sys.argv[1])"
        try:
            proc = subprocess.run([sys.executable, "-c", code, str(request)], env=env, capture_output=True,
                                  text=True, errors="replace", timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return None, f"timed out after {timeout_s:.0f} s"
        if proc.returncode < 0:
            name = signal.Signals(-proc.returncode).name
            return None, f"the runtime died with {name} ({_last_line(proc.stderr)})"
        if not answer.is_file():
            return None, f"the check's process exited with code {proc.returncode} ({_last_line(proc.stderr)})"
        payload = json.loads(answer.read_text(encoding="utf-8"))
        if "error" in payload:
            return None, payload["error"]
        return payload["result"], None


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:200] if lines else "no message"


def _probe_main(request_path: str) -> None:
    """Entry point of the child process: run the probe named in the request file, write the answer file."""
    request = json.loads(Path(request_path).read_text(encoding="utf-8"))
    probes = {"tokenize_probe": tokenize_probe, "quality_probe": quality_probe, "stop_probe": stop_probe}
    try:
        payload = {"result": probes[request["probe"]](**request["args"])}
    except Exception as err:  # noqa: BLE001 - reported to the parent as the check's failure
        payload = {"error": f"{type(err).__name__}: {err}"}
    Path(request["answer"]).write_text(json.dumps(payload, ensure_ascii=False), encoding="utf-8")


def _load(gguf: str, **kwargs):
    from llama_cpp import Llama

    return Llama(model_path=gguf, verbose=False, **kwargs)


def _token_text(llm, token: int) -> str:
    return llm.detokenize([token], special=True).decode("utf-8", errors="replace")


def tokenize_probe(gguf: str, texts: list[str], chats: list, expected_template: str | None,
                   token_texts: list[str]) -> dict:
    """(child) The GGUF's ids for `texts`, its metadata, and its renderings of `chats`."""
    import llama_cpp

    from . import prompt

    llm = _load(gguf, vocab_only=True)
    meta = llm.metadata
    ftype = int(meta.get("general.file_type", -1))
    names = {getattr(llama_cpp, n): n[len("LLAMA_FTYPE_MOSTLY_"):].lower()
             for n in dir(llama_cpp) if n.startswith("LLAMA_FTYPE_MOSTLY_")}
    names[0] = "f32"
    bos, eos = llm.token_bos(), llm.token_eos()
    bos_text, eos_text = _token_text(llm, bos), _token_text(llm, eos)
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
    render = {"bos_token": bos_text, "eos_token": eos_text}
    try:
        for chat in chats:
            rendered = prompt.render_chat(template, chat, **render)
            ids = tok(rendered, True)
            entry = {"rendered": rendered, "ids": ids, "double_bos": ids[:2] == [bos, bos],
                     "contents_found": _contents_found(rendered, chat)}
            if expected_template is not None:
                entry["expected_rendered"] = prompt.render_chat(expected_template, chat, **render)
                entry["expected_ids"] = tok(entry["expected_rendered"], True)
            out["chats"].append(entry)
        closing = prompt.render_chat(
            template, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _SENTINEL}],
            add_generation_prompt=False, **render)
        after = closing.split(_SENTINEL, 1)[1].lstrip(" ") if _SENTINEL in closing else ""
        after_ids = tok(after, True)
        if after_ids and llama_cpp.llama_vocab_get_attr(vocab, after_ids[0]) & llama_cpp.LLAMA_TOKEN_ATTR_CONTROL:
            out["turn_end_id"] = after_ids[0]
            out["token_text"][str(after_ids[0])] = _token_text(llm, after_ids[0])
    except Exception as err:  # noqa: BLE001 - a template that does not render is the finding
        out["render_error"] = str(err)
    return out


def _contents_found(rendered: str, chat: list) -> bool:
    return all((m["content"].strip() in rendered) for m in chat)


def _log_softmax(logits):
    import numpy as np

    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def quality_probe(gguf: str, ref: str, texts: dict, n_ctx: int, max_tokens: int, threads: int) -> dict:
    """(child) KL divergence, same-top share and perplexities of `gguf` against `ref` on each text."""
    import numpy as np

    llm = _load(gguf, n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, logits_all=True, n_threads=threads)
    bos = llm.token_bos()
    if ref.endswith(".gguf"):
        ref_llm = _load(ref, n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, logits_all=True, n_threads=threads)

        def ref_logits(ids):
            ref_llm.reset()
            ref_llm.eval(ids)
            return np.array(ref_llm.scores[: len(ids)], dtype=np.float32)
    else:
        import torch
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(threads)
        model = AutoModelForCausalLM.from_pretrained(ref, dtype=torch.float32, use_safetensors=True)
        model.eval()

        def ref_logits(ids):
            with torch.inference_mode():
                return model(torch.tensor([ids])).logits[0].float().numpy()

    results = {}
    for lang, text in texts.items():
        ids = llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)[:max_tokens]
        kld_sum = same = nll_ref = nll_q = 0.0
        positions = 0
        for start in range(0, len(ids), n_ctx - 1):
            chunk = [bos] + ids[start:start + n_ctx - 1]
            if len(chunk) < 3:
                continue
            llm.reset()
            llm.eval(chunk)
            q = np.array(llm.scores[: len(chunk)], dtype=np.float32)
            p = ref_logits(chunk)
            if p.shape != q.shape:
                raise ValueError(f"reference logits {p.shape} vs GGUF {q.shape}: vocabularies differ")
            # Score the predictions of the chunk's own tokens (the last position predicts past the chunk).
            for rows in range(0, len(chunk) - 1, 64):
                sl = slice(rows, min(rows + 64, len(chunk) - 1))
                lp, lq = _log_softmax(p[sl].astype(np.float64)), _log_softmax(q[sl].astype(np.float64))
                kld_sum += float((np.exp(lp) * (lp - lq)).sum())
                same += int((lp.argmax(-1) == lq.argmax(-1)).sum())
                targets = np.array(chunk[sl.start + 1: sl.stop + 1])
                nll_ref -= float(lp[np.arange(len(targets)), targets].sum())
                nll_q -= float(lq[np.arange(len(targets)), targets].sum())
                positions += len(targets)
        if positions == 0:
            raise ValueError(f"the {lang} text gave no tokens to evaluate")
        ppl_ref, ppl_q = math.exp(nll_ref / positions), math.exp(nll_q / positions)
        results[lang] = {
            "positions": positions, "kld_mean": kld_sum / positions, "same_top": same / positions,
            "ppl_ref": ppl_ref, "ppl_gguf": ppl_q, "ppl_ratio": ppl_q / ppl_ref,
        }
    return results


# A question even a very small model answers in one short sentence (SmolLM2-135M: "The capital of France is Paris.").
STOP_CHAT = [{"role": "user", "content": "What is the capital of France?"}]
FORCED_AFTER = 8  # generated tokens before the forced stop


def stop_probe(gguf: str, mode: str, stop_ids: list[int], max_new_tokens: int, threads: int,
               detect_untrained: bool) -> dict:
    """(child) Greedy reply to a short chat: did it end with an end-of-generation token, and on what text?"""
    import llama_cpp
    import numpy as np

    from . import prompt

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
    bos_text, eos_text = _token_text(llm, llm.token_bos()), _token_text(llm, llm.token_eos())
    tokens = prompt.tokenize_chat(lambda t, s: llm.tokenize(t.encode(), add_bos=False, special=s), template,
                                  STOP_CHAT, bos_token=bos_text, eos_token=eos_text)
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
               template_text=(_token_text(llm, control[0]) if control else (markers[0] if markers else "")))
    return out
