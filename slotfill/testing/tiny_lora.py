"""Generate a LoRA adapter (PEFT layout) for the tiny test model, offline.

Written with numpy + safetensors only (no torch, no peft): ``adapter_config.json`` and
``adapter_model.safetensors`` with PEFT's tensor names, which vLLM's LoRA loader reads.
The base model runs with ``load_format="dummy"`` (vLLM fills weights with values of about
1e-3), so B matrices of a much larger scale make the adapter visibly change the output.
"""

from __future__ import annotations

import json
from pathlib import Path

from worker.engines.tiny_model import TINY_CONFIG

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _dim(key: str) -> int:
    value = TINY_CONFIG[key]
    assert isinstance(value, int)
    return value


def _shapes() -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each target module of one decoder layer."""
    hidden, inter, head = _dim("hidden_size"), _dim("intermediate_size"), _dim("head_dim")
    q, kv = _dim("num_attention_heads") * head, _dim("num_key_value_heads") * head
    return {"q_proj": (hidden, q), "k_proj": (hidden, kv), "v_proj": (hidden, kv),
            "o_proj": (q, hidden), "gate_proj": (hidden, inter), "up_proj": (hidden, inter),
            "down_proj": (inter, hidden)}


def make_tiny_lora(out_dir: str | Path, rank: int = 8, scale: float = 0.5, seed: int = 0) -> Path:
    """Write an adapter into ``out_dir`` (overwriting) and return its path. ``scale`` is the
    standard deviation of the A and B entries; non-zero B is what makes it change anything
    (PEFT initialises B to zero)."""
    import numpy as np
    from safetensors.numpy import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    tensors: dict[str, np.ndarray] = {}
    shapes = _shapes()
    for layer in range(_dim("num_hidden_layers")):
        for module in TARGETS:
            n_in, n_out = shapes[module]
            group = "self_attn" if module.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
            prefix = f"base_model.model.model.layers.{layer}.{group}.{module}"
            tensors[f"{prefix}.lora_A.weight"] = (
                rng.standard_normal((rank, n_in)) * scale).astype(np.float32)
            tensors[f"{prefix}.lora_B.weight"] = (
                rng.standard_normal((n_out, rank)) * scale).astype(np.float32)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": rank,
        "lora_dropout": 0.0, "bias": "none", "target_modules": list(TARGETS),
        "base_model_name_or_path": "tiny",
    }, indent=1))
    return out
