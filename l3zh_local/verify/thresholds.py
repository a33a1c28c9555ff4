"""Pass limits of the quality check, per quant type, drawn from llama.cpp's published Llama-3-8B figures."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from ..errors import InputError

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



# Untrained (random-weight) models: the KLD limit is widened by this factor (see checks.quality_check) and the
# same-top share is not judged. A trained model's perplexity on ordinary prose is far below UNTRAINED_PPL; a random
# one's is about the vocabulary size.
UNTRAINED_KLD_FACTOR = 2.0
UNTRAINED_PPL = 1000.0
