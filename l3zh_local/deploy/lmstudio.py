"""LM Studio presets derived from a chat family: the current format and the 0.2 legacy format.

Current format (`*.preset.json`, LM Studio 0.3+): the prompt template is the family's Jinja (the same text the GGUF
carries, so the preset agrees with LM Studio's default), plus system prompt, stop strings and sampling.

Legacy format (`*.legacy.preset.json`, LM Studio 0.2, still read by 0.3.3+): only fixed prefixes and suffixes.
LM Studio 0.2 assembles `pre_prompt_prefix + system + pre_prompt_suffix`, then for each user turn
`input_prefix + text + input_suffix` followed by the reply, and it drops the stop string from stored replies, so
the text that closes a reply must come back at the start of `input_prefix` (LM Studio's own "Llama 3 V2" preset
does the same). That works exactly when the system block closes with the same text as a reply (Llama-3, Llama-3.1,
ChatML). For the `<<SYS>>` families, whose system block ends differently, the legacy preset is exact only for the
first turn. The legacy format cannot merge consecutive messages of one role either. Prefer the current format.
"""

from __future__ import annotations

import json

from ..templates import ChatFamily


def preset_identifier(model_name: str) -> str:
    safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in model_name.lower())
    return f"@local:l3zh-{safe}"


def current_preset(family: ChatFamily, model_name: str, num_ctx: int) -> dict:
    """LM Studio 0.3+ preset: Jinja prompt template, system prompt, stops, sampling, context length."""
    s = family.sampling
    template: dict = {"type": "jinja", "jinjaPromptTemplate": {"template": family.jinja},
                      "stopStrings": list(family.stop_tokens)}
    manual = family.manual_prompt_template()
    if manual is not None:
        template["manualPromptTemplate"] = manual
    return {
        "identifier": preset_identifier(model_name),
        "name": f"{model_name} ({family.name}, l3zh-local)",
        "changed": False,
        "operation": {
            "fields": [
                {"key": "llm.prediction.systemPrompt", "value": family.default_system or ""},
                {"key": "llm.prediction.temperature", "value": s.temperature},
                {"key": "llm.prediction.topPSampling", "value": {"checked": True, "value": s.top_p}},
                {"key": "llm.prediction.repeatPenalty", "value": {"checked": True, "value": s.repeat_penalty}},
                {"key": "llm.prediction.maxPredictedTokens", "value": {"checked": True, "value": s.max_tokens}},
                {"key": "llm.prediction.stopStrings", "value": list(family.stop_tokens)},
                {"key": "llm.prediction.promptTemplate", "value": template},
            ]
        },
        "load": {"fields": [{"key": "llm.load.contextLength", "value": int(num_ctx)}]},
    }


def legacy_preset(family: ChatFamily, model_name: str, num_ctx: int) -> dict:
    """LM Studio 0.2 preset (input_prefix, input_suffix, pre_prompt...); see the module docstring for its limits."""
    s = family.sampling
    params = {
        "pre_prompt": family.default_system or "",
        "antiprompt": list(family.stop_tokens),
        "temp": s.temperature,
        "top_p": s.top_p,
        "repeat_penalty": s.repeat_penalty,
        "n_predict": s.max_tokens,
    }
    t = family.turns
    if t is not None:
        # The reply's closing text is dropped with the stop string; put it back in front of the next user turn.
        closes_like_reply = t.system_suffix == t.assistant_suffix
        params.update(
            pre_prompt_prefix=t.system_prefix,
            pre_prompt_suffix="" if closes_like_reply else t.system_suffix,
            input_prefix=(t.assistant_suffix if closes_like_reply else "") + t.user_prefix,
            input_suffix=t.user_suffix + t.assistant_prefix,
        )
    return {"name": f"{model_name} ({family.name}, l3zh-local, legacy)", "load_params": {"n_ctx": int(num_ctx)},
            "inference_params": params}


def install_hint(gguf_name: str, model_name: str) -> str:
    """Where LM Studio wants the files."""
    return (
        f"LM Studio: copy the presets to ~/.lmstudio/config-presets/ and the model to "
        f"~/.lmstudio/models/l3zh-local/{model_name}/{gguf_name} (or run: lms import {gguf_name})"
    )


def model_yaml(family: ChatFamily, model_name: str, gguf_name: str, num_ctx: int) -> str:
    """LM Studio's ``model.yaml`` for one GGUF: the context length in the load config, the family's template,
    stops and sampling in the operation config (a preset cannot carry load settings; a model.yaml can).

    The base key names the folder `install_hint` tells the user to copy the GGUF into (there is no download
    source: the GGUF is local). Strings are written as JSON
    strings, which YAML reads as double-quoted scalars, so templates keep every character.
    """
    preset = current_preset(family, model_name, num_ctx)
    safe = preset_identifier(model_name).removeprefix("@local:")

    def value(data, indent: int) -> list[str]:
        pad = " " * indent
        if isinstance(data, dict):
            lines = []
            for key, item in data.items():
                if isinstance(item, (dict, list)) and item:
                    lines += [f"{pad}{key}:", *value(item, indent + 2)]
                else:
                    lines.append(f"{pad}{key}: {json.dumps(item, ensure_ascii=False)}")
            return lines
        if isinstance(data, list):
            lines = []
            for item in data:
                inner = value(item, indent + 2) if isinstance(item, (dict, list)) and item else [
                    f"{pad}  {json.dumps(item, ensure_ascii=False)}"]
                lines.append(f"{pad}- {inner[0].lstrip()}")
                lines += inner[1:]
            return lines
        return [f"{pad}{json.dumps(data, ensure_ascii=False)}"]

    document = {
        "model": f"l3zh-local/{safe}",
        # No download source: LM Studio finds the concrete model by this key in its models folder.
        "base": [{"key": f"l3zh-local/{model_name}", "sources": []}],
        "metadataOverrides": {"domain": "llm", "compatibilityTypes": ["gguf"]},
        "config": {"operation": preset["operation"], "load": preset["load"]},
    }
    header = [f"# LM Studio model.yaml written by l3zh-local for {gguf_name} (chat family {family.name}).",
              f"# Copy the GGUF to ~/.lmstudio/models/l3zh-local/{model_name}/ as install_hint says; this file sets",
              "# its context length (load config) and its template, stops and sampling (operation config)."]
    return "\n".join(header + value(document, 0)) + "\n"
