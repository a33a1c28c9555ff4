"""Trained-looking PEFT LoRA adapters built offline, for the merge tests and the merge benchmark.

PEFT initialises lora_B to zero, so a fresh adapter changes nothing; here B (and every module in
``modules_to_save``) gets random values, as after training, and the adapter is saved with PEFT's own
``save_pretrained`` so the files are exactly what users bring.
"""

from __future__ import annotations

from pathlib import Path

# The seed's DPO recipe: rank 128, alpha 256, these projections, and the norms and lm_head trained in full.
SEED_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SEED_MODULES_TO_SAVE = ["lm_head", "input_layernorm", "post_attention_layernorm", "norm"]


def random_lora_adapter(
    base_dir: Path,
    out_dir: Path,
    *,
    seed: int = 0,
    b_std: float = 0.01,
    saved_std: float = 0.02,
    dtype: str = "bfloat16",
    **lora_config,
) -> Path:
    """Save a LoRA adapter for the model in `base_dir` with non-zero updates and perturbed saved modules.

    `lora_config` goes to peft.LoraConfig (r, lora_alpha, target_modules, modules_to_save, use_rslora, ...).
    The base is loaded with `from_pretrained`, so the adapter records `base_dir` as its base model.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=getattr(torch, dtype))
    peft_model = get_peft_model(model, LoraConfig(**lora_config))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            # PEFT zero-initialises one half of each pair (lora_B, or lora_embedding_A for embeddings), and
            # lora_B's bias: those get random values, the other half keeps PEFT's own initialisation.
            if ".lora_" in name and not param.any():
                param.normal_(0.0, b_std)
            elif ".modules_to_save." in name:
                param.add_(torch.randn_like(param) * saved_std)
    peft_model.save_pretrained(out_dir)
    return Path(out_dir)
