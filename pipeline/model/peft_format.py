"""Our adapters in peft's LoRA format, out and in.

Attention LoRA maps to peft's `target_modules` (`lora_A [r, in]`, `lora_B [out, r]`, as ours).
Expert LoRA maps to `target_parameters` on the fused `experts.gate_up_proj [E, 2I, H]` and
`experts.down_proj [E, H, I]`: peft's `ParamWrapper` keeps all experts' factors in one
`lora_A [E*r, in]` (row `e*r + j` is expert e's A row j) and one `lora_B [out, r*E]` (column
`j*E + e` is expert e's B column j) and adds `scale * B_e @ A_e` to each expert's weight, which is
what `HeteroMoEBlock` computes per routed token. peft nests the two wrappers on `experts` in
parameter order, so gate_up's tensors sit under `experts.base_layer.` and down's under `experts.`.

The tensors are written and read directly under peft's key names rather than through a
PeftModel, which would need a second copy of the whole model; the round trip through peft
itself is tested (tests/e2e/test_export.py).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from pipeline.model.lora import LoRALinear
from pipeline.model.moe_block import HeteroMoEBlock

PREFIX = "base_model.model."
CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
EXPERT_TARGETS = ("experts.gate_up_proj", "experts.down_proj")  # peft's target_parameters
# (our block's pair, the peft module path under the block's mlp) in peft's nesting order
_EXPERT_KEYS = (("gate_up", "experts.base_layer"), ("down", "experts"))


class AdapterMismatch(ValueError):
    """A peft adapter that does not fit the model (rank, targets, shapes, options)."""


def _lora_pieces(model: nn.Module):
    """(module name, module) for every LoRALinear and every block with expert LoRA."""
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear) or (isinstance(module, HeteroMoEBlock) and module.has_lora):
            yield name, module


# ---------------------------------------------------------------------------------------------
# Out


def peft_tensors(model: nn.Module) -> tuple[dict[str, Tensor], dict]:
    """The adapters at the active rank and scale as peft tensors, and the LoraConfig fields."""
    tensors, modules, ranks, scales, experts = {}, set(), set(), set(), False
    for name, m in _lora_pieces(model):
        r = m.active_rank
        ranks.add(r)
        scales.add(m.scale)
        if isinstance(m, LoRALinear):
            a, b = m.factors()
            tensors[f"{PREFIX}{name}.lora_A.weight"] = a.detach().float().contiguous().clone()
            tensors[f"{PREFIX}{name}.lora_B.weight"] = b.detach().float().contiguous().clone()
            modules.add(name.rsplit(".", 1)[-1])
            continue
        experts = True
        for pair, path in _EXPERT_KEYS:
            a = getattr(m, f"lora_{pair}_A").detach()[:, :r].float()  # [E, r, in]
            b = getattr(m, f"lora_{pair}_B").detach()[..., :r].float()  # [E, out, r]
            tensors[f"{PREFIX}{name}.{path}.lora_A.weight"] = a.reshape(-1, a.shape[-1]).contiguous()
            tensors[f"{PREFIX}{name}.{path}.lora_B.weight"] = b.permute(1, 2, 0).reshape(b.shape[1], -1).contiguous()
    if not tensors:
        raise ValueError("model has no LoRA to export")
    if len(ranks) > 1 or len(scales) > 1:
        raise ValueError(f"LoRA with mixed ranks {sorted(ranks)} or scales {sorted(scales)}")
    r, scale = ranks.pop(), scales.pop()
    fields = dict(r=r, lora_alpha=scale * r, target_modules=sorted(modules),
                  target_parameters=list(EXPERT_TARGETS) if experts else None,
                  lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")
    return tensors, fields


def save_peft_adapter(model: nn.Module, out_dir: str | Path, base_model: str | None = None) -> dict:
    """`adapter_config.json` + `adapter_model.safetensors` that `PeftModel.from_pretrained(base,
    out_dir)` loads onto the plain Hugging Face model; returns the LoraConfig fields written."""
    from peft import LoraConfig  # imported here: peft takes a while to import, and only this needs it

    tensors, fields = peft_tensors(model)
    config = LoraConfig(**fields, base_model_name_or_path=base_model)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(out_dir))
    save_file(tensors, str(out_dir / WEIGHTS_FILE), metadata={"format": "pt"})
    return fields


# ---------------------------------------------------------------------------------------------
# In


@dataclass
class PeftAdapter:
    """A peft LoRA adapter read from disk, keyed by our adapter names, at its own scale."""

    path: Path
    rank: int
    scale: float  # lora_alpha / r (or / sqrt(r) under rslora)
    attention_modules: tuple[str, ...]  # q_proj, ... (empty: no attention LoRA)
    experts: bool  # expert LoRA on both fused projections
    tensors: dict[str, Tensor]  # our names (model.layers.0.self_attn.q_proj.lora_A, ...lora_gate_up_B)
    num_experts: int | None = None


_UNSUPPORTED = {"use_dora": False, "fan_in_fan_out": False, "rank_pattern": {}, "alpha_pattern": {},
                "modules_to_save": None, "layers_to_transform": None}


def read_peft_adapter(path: str | Path) -> PeftAdapter:
    """Read and check a peft LoRA directory on its own (files, options, shapes among themselves);
    `check_fits` then checks it against a model. Raises AdapterMismatch with one line."""
    path = Path(path)
    if not path.is_dir():
        raise AdapterMismatch(f"{path}: no such directory")
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (path / name).is_file():
            raise AdapterMismatch(f"{path}: no {name} (a peft LoRA adapter directory has both)")
    try:
        config = json.loads((path / CONFIG_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise AdapterMismatch(f"{path / CONFIG_FILE}: not readable JSON ({exc})") from None
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        raise AdapterMismatch(f"{path / CONFIG_FILE}: not a peft LoRA adapter (peft_type "
                              f"{config.get('peft_type') if isinstance(config, dict) else None!r})")
    for key, plain in _UNSUPPORTED.items():
        if config.get(key) not in (plain, None, [], {}, False):
            raise AdapterMismatch(f"{path / CONFIG_FILE}: {key}={config[key]!r} is not supported")
    if config.get("bias", "none") != "none":
        raise AdapterMismatch(f"{path / CONFIG_FILE}: bias={config['bias']!r} is not supported")
    r, alpha = config.get("r"), config.get("lora_alpha")
    if not isinstance(r, int) or r < 1 or not isinstance(alpha, (int, float)) or alpha <= 0:
        raise AdapterMismatch(f"{path / CONFIG_FILE}: r={r!r}, lora_alpha={alpha!r}: expected r >= 1, alpha > 0")
    scale = alpha / (math.sqrt(r) if config.get("use_rslora") else r)
    try:
        raw = load_file(str(path / WEIGHTS_FILE))
    except (SafetensorError, OSError) as exc:
        raise AdapterMismatch(f"{path / WEIGHTS_FILE}: cannot be read ({exc})") from None
    tensors, modules, experts = _our_names(path, raw)
    if not tensors:
        raise AdapterMismatch(f"{path / WEIGHTS_FILE}: holds no LoRA factors")
    adapter = PeftAdapter(path, r, float(scale), tuple(sorted(modules)), bool(experts), {})
    adapter.tensors = _our_layout(adapter, tensors)
    return adapter


def _our_names(path: Path, raw: dict[str, Tensor]):
    """peft keys -> (our key, factor) and the targets they name; a key we cannot place is an error."""
    out, modules, experts = {}, set(), set()
    for key, value in raw.items():
        if not key.startswith(PREFIX) or not key.endswith((".lora_A.weight", ".lora_B.weight")):
            raise AdapterMismatch(f"{path / WEIGHTS_FILE}: tensor {key!r} is not a LoRA factor fedmoe can load")
        body, factor = key[len(PREFIX):].rsplit(".", 2)[0], key.rsplit(".", 2)[1][-1]  # A or B
        for pair, tail in _EXPERT_KEYS:
            if body.endswith(".mlp." + tail):
                block = body[: -len("." + tail)]
                out[f"{block}.lora_{pair}_{factor}"] = value
                experts.add(block)
                break
        else:
            if ".self_attn." not in body:
                raise AdapterMismatch(f"{path}: adapts {body!r}; fedmoe adapts only attention projections "
                                      f"and {', '.join(EXPERT_TARGETS)}")
            out[f"{body}.lora_{factor}"] = value
            modules.add(body.rsplit(".", 1)[-1])
    return out, modules, experts


def _our_layout(adapter: PeftAdapter, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """peft's [E*r, in] / [out, r*E] expert factors as our [E, r, in] / [E, out, r]; ranks checked."""
    r, out = adapter.rank, {}
    for key, value in tensors.items():
        value = value.float()
        leaf = key.rsplit(".", 1)[-1]
        expert = leaf.startswith(("lora_gate_up", "lora_down"))
        rows = (value.shape[0] if leaf.endswith("A") else value.shape[1]) if value.dim() == 2 else 0
        if not rows or rows % r or (not expert and rows != r):
            raise AdapterMismatch(f"{adapter.path}: {key} has shape {tuple(value.shape)}, not LoRA rank r={r}")
        if expert:
            num = rows // r
            if adapter.num_experts not in (None, num):
                raise AdapterMismatch(f"{adapter.path}: {key} holds {num} experts, others {adapter.num_experts}")
            adapter.num_experts = num
            value = (value.reshape(num, r, -1) if leaf.endswith("A")
                     else value.reshape(value.shape[0], r, num).permute(2, 0, 1))
        out[key] = value.contiguous()
    return out


def check_fits(adapter: PeftAdapter, model: nn.Module, what: str, partial: bool = False) -> None:
    """The adapter adapts exactly the model's LoRA pieces (`partial`: some of them), at the
    model's built rank and shapes. `what` names the source in the message (a field or a flag)."""
    params = {n: p for n, p in model.named_parameters() if n.rsplit(".", 1)[-1].startswith("lora_")}
    ranks = {m.rank for _, m in _lora_pieces(model)}
    if ranks and adapter.rank not in ranks:
        raise AdapterMismatch(f"{what}: {adapter.path} has LoRA rank {adapter.rank}, the model's LoRA "
                              f"has rank {max(ranks)} (model.lora.rank)")
    missing = sorted(set(params) - set(adapter.tensors))
    extra = sorted(set(adapter.tensors) - set(params))
    if extra:
        raise AdapterMismatch(f"{what}: {adapter.path} adapts {extra[0].rsplit('.', 1)[0]!r}, which the model "
                              "does not (model.lora.attention / model.lora.experts)")
    if missing and not partial:
        raise AdapterMismatch(f"{what}: {adapter.path} does not adapt {missing[0].rsplit('.', 1)[0]!r}, "
                              "which the model does (model.lora.attention / model.lora.experts)")
    for name, p in params.items():
        if name in adapter.tensors and tuple(adapter.tensors[name].shape) != tuple(p.shape):
            raise AdapterMismatch(f"{what}: {adapter.path}: {name} has shape "
                                  f"{tuple(adapter.tensors[name].shape)}, the model's {tuple(p.shape)}")


def adapter_state_at_scale(adapter: PeftAdapter, scale: float) -> dict[str, Tensor]:
    """Our adapter tensors such that `scale * B @ A` equals the adapter's own `s * B @ A`: B is
    multiplied by s / scale (not at all when the scales agree, so a round trip is exact)."""
    ratio = adapter.scale / scale
    return {k: (v * ratio if ratio != 1.0 and k.rsplit("_", 1)[-1] == "B" else v.clone())
            for k, v in adapter.tensors.items()}
