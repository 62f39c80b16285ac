"""The README.md model card of an exported run (`fedmoe export`): what it is, how it was made,
how well each tier did, how to load it."""
from __future__ import annotations

from pathlib import Path

from pipeline.eval.report import points
from pipeline.eval.summary import load_summary


def _percent(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def render_card(run_dir: Path, info: dict, tiers: list, command: str) -> str:
    """`info`: what export.json holds (format, tier, top_k, lora_rank, base_model, method, round,
    needs_merged_base, routing_dropped); `tiers`: the run's resolved tiers."""
    summary = load_summary(run_dir)
    peft = info["format"] == "peft"
    base = info["base_model"]
    lines = [f"# fedmoe export of `{run_dir}`", "",
             f"A {'peft LoRA adapter' if peft else 'Hugging Face OLMoE model (adapters merged)'} "
             f"fine-tuned federatedly by fedmoe with `{info['method']}`, round {info['round']} of "
             f"{summary['rounds'] or info['round']}.", "",
             "| | |", "|---|---|",
             f"| base model | `{info['source_model']}` |",
             f"| method | `{info['method']}` |",
             f"| exported at | {'tier ' + repr(info['tier']) if info['tier'] else 'full top-k and rank'}: "
             f"top-k {info['top_k']}, LoRA rank {info['lora_rank']} |",
             f"| rounds | {summary['rounds']} ({summary['status']}) |", "",
             "## Tiers and their final accuracy", "",
             "| tier | budget | top-k | LoRA rank | base (%) | final (%) | change |",
             "|---|---|---|---|---|---|---|"]
    for tier in tiers:
        s = summary["tiers"].get(tier.name, {})
        lines.append(f"| {tier.name} | {tier.budget:g} | {s.get('top_k', tier.top_k)} | "
                     f"{s.get('lora_rank', tier.lora_rank)} | {_percent(s.get('base'))} | "
                     f"{_percent(s.get('final'))} | {points(s.get('change'))} |")
    if summary["chance"] is not None:
        lines += ["", f"Chance accuracy {100 * summary['chance']:.1f}%; accuracy as `fedmoe eval` "
                      "scores it on the run's held-out set."]
    lines += ["", "## Load it", "", "Experts per token are part of the result: load with "
              f"`num_experts_per_tok={info['top_k']}` to reproduce the accuracy above.", "", "```python",
              "from transformers import AutoConfig, AutoModelForCausalLM"]
    if peft:
        lines += ["from peft import PeftModel", "",
                  f"base = {base!r}",
                  f"config = AutoConfig.from_pretrained(base, num_experts_per_tok={info['top_k']})",
                  "model = AutoModelForCausalLM.from_pretrained(base, config=config)",
                  "model = PeftModel.from_pretrained(model, 'THIS_DIRECTORY')"]
    else:
        lines += ["", f"model = AutoModelForCausalLM.from_pretrained('THIS_DIRECTORY')  "
                      f"# config.json has num_experts_per_tok={info['top_k']}"]
    lines += ["```", ""]
    if peft:
        lines += ["Attention LoRA is in `target_modules`; expert LoRA in `target_parameters` on the fused "
                  "`experts.gate_up_proj` and `experts.down_proj`, which needs a peft that has "
                  f"`target_parameters` (written with peft {info.get('peft_version')}).", ""]
    if info["needs_merged_base"]:
        lines += [f"**The base is not the original model.** `{info['method']}` merges its updates into the "
                  "base weights each round; `base/` holds that merged base (a plain Hugging Face model) and "
                  "the adapter must be loaded onto it, as the snippet does.", ""]
    for name in info["routing_dropped"]:
        lines += [f"Note: the run routes with a learned `{name}`, which a plain Hugging Face OLMoE has no "
                  "place for; this export routes without it, so its accuracy may differ from the table.", ""]
    lines += ["`fedmoe eval --model DIR [--adapter DIR] RUN` evaluates this export, or any OLMoE, on the "
              "run's benchmark and tiers.", "", "## Command", "", "```", command, "```", ""]
    return "\n".join(lines)
