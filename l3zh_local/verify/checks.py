"""The parent side of verify: decide what is expected, run the probes in child processes, judge their answers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .. import evaltext
from ..errors import InputError
from ..hardware import available_memory, physical_cores
from .report import FAIL, PASS, SKIP, WARN, CheckResult, VerifyReport
from .thresholds import SIXTEEN_BIT, UNTRAINED_KLD_FACTOR, UNTRAINED_PPL, QualityThreshold, default_threshold

ALL_CHECKS = ("tokenizer", "template", "eos", "quality", "stop")

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


# ---------------------------------------------------------------------------------------------------------------
# The main entry point
# ---------------------------------------------------------------------------------------------------------------


def verify_gguf(
    gguf: Path,
    *,
    ref: Path | None = None,
    quant_type: str | None = None,
    family: str | None = None,
    expected_template: str | list[str] | None = None,
    expected_eos: str | int | list[int] | None = None,
    stop_tokens: list[int] | None = None,
    thresholds: QualityThreshold | None = None,
    stop_mode: str = "auto",
    max_new_tokens: int = 64,
    n_ctx: int = 512,
    max_eval_tokens: int = 1024,
    threads: int | None = None,
    timeout_s: float = 1800,
    checks: Sequence[str] = ALL_CHECKS,
    long_ctx: int | None = None,
    passkey: bool = True,
) -> VerifyReport:
    """Run every check on `gguf` and return the report (never raises for a failed check).

    ref: the HF folder the GGUF came from, or a 16-bit GGUF of it; without it tokenizer parity and quality are
    skipped. quant_type: names the threshold row (read from the GGUF when None). The expected chat template, EOS and
    stop tokens come from `family` (a chat family of the registry), else from expected_template / expected_eos,
    else from `ref` (its own template, as the family l3zh-local writes for it when it is a known one, and its EOS
    ids); with none of these the template check can only warn. stop_mode: "natural", "forced" (stop token forced
    through the logits), "auto" (natural unless the model is untrained) or "skip". checks: which of ALL_CHECKS to
    run. long_ctx: also run the ``long`` check at this many tokens (verify/longctx.py): parity with the reference
    past the trained context, and the pass-key probe on both (passkey=False skips it).
    """
    gguf = Path(gguf)
    if not gguf.is_file():
        raise InputError(f"no GGUF file at {gguf}")
    if ref is not None:
        ref = Path(ref)
        if not ref.exists():
            raise InputError(f"no reference model at {ref}: give an HF folder or a 16-bit GGUF")
    if long_ctx is not None and long_ctx < 512:
        raise InputError(f"--long {long_ctx} is too short to say anything about long context: give at least 512")
    unknown = set(checks) - set(ALL_CHECKS)
    if unknown:
        raise InputError(f"unknown check {', '.join(sorted(unknown))}: choose from {', '.join(ALL_CHECKS)}")
    if stop_mode not in ("auto", "natural", "forced", "skip"):
        raise InputError(f"unknown stop mode {stop_mode}: choose auto, natural, forced or skip")
    stop_texts: list[str] = []
    basis = "the given template"
    if family is not None:
        expected_template, expected_eos, stop_texts = _from_family(family, expected_template, expected_eos)
        basis = f"family {family}"
    elif expected_template is None and expected_eos is None and ref is not None:
        expected_template, expected_eos, stop_texts, basis = _from_reference(ref)
    threads = threads or physical_cores()

    if expected_template is None:
        basis = "no reference template and no --template"
    expected_ids: list[int | None] = []
    if isinstance(expected_eos, (int, list)):
        expected_ids = [expected_eos] if isinstance(expected_eos, int) else list(expected_eos)
    eos_texts = [expected_eos] if isinstance(expected_eos, str) else []
    probe_args = {
        "gguf": str(gguf), "texts": [c.text for c in evaltext.tokenizer_cases()], "chats": SAMPLE_CHATS,
        "expected_templates": [expected_template] if isinstance(expected_template, str) else expected_template or [],
        "token_texts": eos_texts + stop_texts,
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
            report.checks.append(_template_check(probe, basis))
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
    if long_ctx is not None:
        report.checks.append(_long_check(gguf, ref, long_ctx, report.quant_type, untrained, passkey, threads,
                                         timeout_s))
    return report



def _from_reference(ref: Path) -> tuple[list[str] | None, str | int | list[int] | None, list[str], str]:
    """Expected templates, EOS, stop texts and a description of them, from the model the GGUF came from.

    The reference's own template is expected; where it is a known chat family's, the family's template as
    l3zh-local writes it is accepted too (Meta's Llama-3 template trims messages, the family's does not: see
    templates/family.py), and the family's EOS and stops are expected.
    """
    from .. import ggufmeta
    from ..convert import existing_chat_template
    from ..templates import detect_family

    if ref.suffix == ".gguf":
        meta = ggufmeta.read_metadata(ref)
        template = meta.get("tokenizer.chat_template")
        return ([template] if template else None, meta.get("tokenizer.ggml.eos_token_id"), [],
                "the reference GGUF's template")
    template = existing_chat_template(ref)
    eos_ids = _hf_eos_ids(ref)
    if template is None:
        return None, eos_ids, [], "the reference has no chat template"
    try:
        fam = detect_family(template)
    except InputError:
        return [template], eos_ids, [], "the reference's own chat template"
    return ([template, fam.jinja], fam.eos_token, list(fam.stop_tokens),
            f"the reference's template (family {fam.name})")


def _hf_eos_ids(ref: Path) -> list[int] | None:
    """EOS ids an HF folder declares (generation_config.json, else config.json); None when it declares none."""
    from ..files import read_json

    for name in ("generation_config.json", "config.json"):
        path = ref / name
        eos = read_json(path).get("eos_token_id") if path.is_file() else None
        if eos is not None:
            return [eos] if isinstance(eos, int) else [int(i) for i in eos]
    return None


def _from_family(family: str, expected_template, expected_eos) -> tuple[str, str | int | list[int], list[str]]:
    """Expected template, EOS and stop-token texts from the template registry (explicit arguments win)."""
    from ..templates import get_family

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
            "tokenize_probe", {"gguf": str(ref), "texts": texts, "chats": [], "expected_templates": [],
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


def _template_check(probe: dict, basis: str) -> CheckResult:
    """The GGUF's template against each acceptable expected template: it passes when one of them gives the same
    ids on every sample chat."""
    if not probe["chat_template"]:
        return CheckResult("template", FAIL, "the GGUF has no tokenizer.chat_template")
    if probe["render_error"]:
        return CheckResult("template", FAIL, f"the GGUF's chat template fails: {probe['render_error']}")
    chats = probe["chats"]
    problems = []
    for i, chat in enumerate(chats):
        if chat["double_bos"]:
            problems.append(f"chat {i}: the rendered prompt starts with two BOS tokens")
        if not chat["contents_found"]:
            problems.append(f"chat {i}: a message's text is missing from the rendering")
    n_expected = len(chats[0]["expected"]) if chats else 0
    matching = [k for k in range(n_expected) if all(c["ids"] == c["expected"][k]["ids"] for c in chats)]
    if n_expected and not matching:
        i, chat = next((i, c) for i, c in enumerate(chats) if c["ids"] != c["expected"][0]["ids"])
        want = chat["expected"][0]
        problems.append(f"chat {i} differs from {basis} at token {_first_diff(chat['ids'], want['ids'])}: gguf "
                        f"{chat['rendered'][:60]!r} vs expected {want['rendered'][:60]!r}")
    figures = {"chats": len(chats), "problems": problems[:5], "expected_from": basis,
               "compared_with_expected": bool(n_expected)}
    if problems:
        return CheckResult("template", FAIL, f"{len(problems)} problem(s); first: {problems[0]}", figures)
    if not n_expected:
        return CheckResult("template", WARN, f"{len(chats)} chats render, but there is nothing to compare them "
                           f"with ({basis}): pass --template NAME", figures)
    return CheckResult("template", PASS, f"{len(chats)} chats give the ids of {basis}", figures)


def _first_diff(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def _eos_check(probe: dict, expected_eos: str | int | list[int] | None) -> CheckResult:
    eos, texts = probe["eos_id"], probe["token_text"]
    figures = {"eos_id": eos, "eos_text": texts.get(str(eos)), "turn_end_id": probe["turn_end_id"],
               "eos_is_eog": probe["eos_is_eog"]}
    if expected_eos is not None:
        if isinstance(expected_eos, str):
            want = [probe["token_text_ids"].get(expected_eos)]
            if want[0] is None:
                return CheckResult("eos", FAIL, f"expected stop token {expected_eos!r} is not in the GGUF's "
                                   "vocabulary", figures)
        else:
            want = [expected_eos] if isinstance(expected_eos, int) else list(expected_eos)
        figures["expected_ids"] = want
        if eos not in want:
            return CheckResult("eos", FAIL, f"EOS is {eos} {texts.get(str(eos))!r}, expected "
                               f"{' or '.join(map(str, want))} ({expected_eos!r})", figures)
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
    texts = {lang: evaltext.heldout_text(lang) for lang in evaltext.LANGUAGES}
    # The reference runs first and alone; its log-probabilities wait on disk beside the GGUF (positions x
    # vocabulary x 4 bytes: ~1 GB for 2 x 1024 tokens of Llama-3) while the GGUF runs in a second process.
    folder = Path(gguf).parent if os.access(Path(gguf).parent, os.W_OK) else Path(tempfile.gettempdir())
    with tempfile.TemporaryDirectory(prefix=".l3zh-verify-", dir=folder) as tmp:
        logprobs = str(Path(tmp) / "reference.logprobs.f32")
        base, crash = _isolated("reference_probe", {
            "gguf": str(gguf), "ref": str(ref), "texts": texts, "n_ctx": n_ctx, "max_tokens": max_eval_tokens,
            "threads": threads, "logprobs_path": logprobs}, timeout_s)
        if crash:
            return CheckResult("quality", FAIL, f"the reference could not be evaluated: {crash}",
                               {"thresholds": thresholds.to_dict()})
        result, crash = _isolated("quality_probe", {
            "gguf": str(gguf), "chunks": base["chunks"], "vocab_size": base["vocab_size"], "logprobs_path": logprobs,
            "n_ctx": n_ctx, "threads": threads}, timeout_s)
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


def _long_check(gguf: Path, ref: Path | None, n_tokens: int, quant_type: str | None, untrained: bool | None,
                passkey: bool, threads: int, timeout_s: float) -> CheckResult:
    """Parity with the reference past the trained context (held-out text), then the pass-key probe on both."""
    from ..context import original_context
    from ..files import read_json

    trained = 8192
    if ref is not None and ref.suffix != ".gguf":
        _check_fp32_fits(ref)
        trained = original_context(read_json(ref / "config.json"))
    start = min(trained, n_tokens // 2)
    args = {"gguf": str(gguf), "ref": str(ref) if ref else None, "n_tokens": n_tokens, "start": start,
            "threads": threads, "passkey": passkey}
    result, crash = _isolated("long_probe", args, timeout_s)
    if crash:
        return CheckResult("long", FAIL, f"the long-context run failed: {crash}")
    problems, parts = [], []
    figures: dict = {"n_tokens": n_tokens, **result}
    parity = result.get("parity")
    if parity is not None:
        limit = default_threshold(quant_type).max_kld if quant_type else default_threshold("f16").max_kld
        if untrained and quant_type not in SIXTEEN_BIT:
            limit = round(limit * UNTRAINED_KLD_FACTOR, 6)
        figures["max_kld"] = limit
        parts.append(f"past {start}: KLD {parity['kld_mean']:.3g} (limit {limit:g}), same top "
                     f"{parity['same_top']:.1%} over {parity['positions']} positions")
        if parity["kld_mean"] > limit:
            problems.append(f"positions past {start} differ from the reference: KLD {parity['kld_mean']:.4g} > "
                            f"{limit:g} (wrong RoPE base or scaling?)")
    else:
        parts.append("no reference: parity not checked")
    if passkey:
        mine, theirs = result["passkey_gguf"], result.get("passkey_ref")
        said = "found" if mine["retrieved"] else f"missed ({mine['answer']!r})"
        ref_said = ("" if theirs is None else
                    "; reference " + ("found it" if theirs["retrieved"] else f"missed it too ({theirs['answer']!r})"))
        parts.append(f"pass key at {mine['tokens']} tokens: {said}{ref_said}")
        if not mine["retrieved"] and theirs is not None and theirs["retrieved"]:
            problems.append(f"the reference finds the pass key at {mine['tokens']} tokens, the GGUF does not")
    if problems:
        return CheckResult("long", FAIL, "; ".join(problems), figures)
    return CheckResult("long", PASS, "; ".join(parts), figures)


def _check_fp32_fits(ref: Path) -> None:
    """An HF reference runs in fp32: refuse early, pointing to the 16-bit GGUF, when that cannot fit in memory."""
    from ..hfmodel import inspect_model

    need = inspect_model(ref).n_params * 4
    free = available_memory()
    if free is not None and need > free:
        raise InputError(f"the HF reference needs about {need / 2**30:.1f} GiB in fp32 but {free / 2**30:.1f} GiB "
                         "is free: pass its 16-bit GGUF as --ref instead")


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
    package_parent = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_parent, env.get("PYTHONPATH")) if p)
    with tempfile.TemporaryDirectory(prefix="l3zh-verify-") as tmp:
        request, answer = Path(tmp) / "request.json", Path(tmp) / "answer.json"
        request.write_text(json.dumps({"probe": probe, "args": args, "answer": str(answer)}), encoding="utf-8")
        code = "import sys; from l3zh_local.verify.probes import main; main(sys.argv[1])"
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

