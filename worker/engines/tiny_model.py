"""Generate a tiny Llama model directory (config + locally trained tokenizer) offline.

Weights are never written: the engine loads it with ``load_format="dummy"`` (random weights).
The shape is one the vLLM CPU backend accepts (head_dim 64; 16 fails there).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
WORDS = (
    "the a queue worker engine batch slot token stream redis job result fleet model prompt "
    "reply latency throughput gpu cpu wait full idle refill lease reclaim poison cancel "
    "deadline priority chat user system assistant hello world data fast slow one two three"
).split()

TINY_CONFIG: dict[str, object] = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama",
    "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64,
    "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "silu",
    "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "bos_token_id": 0, "eos_token_id": 1,
}
"""The model's shape (``config.json`` less the vocabulary size, which the tokenizer sets);
tiny_lora.py sizes its adapters from it."""


def _corpus(n_lines: int = 4000, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 20))) for _ in range(n_lines)]


def _train_tokenizer(out: Path, merges: int = 512) -> int:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<s>", "</s>", "<unk>"]
    trainer = trainers.BpeTrainer(
        vocab_size=256 + merges + len(specials), special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "model_max_length": 4096, "chat_template": CHAT_TEMPLATE,
        "add_bos_token": False,
    }, indent=1))
    (out / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}))
    return int(tok.get_vocab_size())


def make_tiny_model(out_dir: str | Path, max_position_embeddings: int = 2048) -> Path:
    """Write the tiny model into ``out_dir`` (idempotent) and return its path."""
    out = Path(out_dir)
    if (out / "config.json").exists() and (out / "tokenizer.json").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    vocab = _train_tokenizer(out)
    config = {**TINY_CONFIG, "vocab_size": vocab,
              "max_position_embeddings": max_position_embeddings}
    (out / "config.json").write_text(json.dumps(config, indent=1))
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": 1}))
    return out
