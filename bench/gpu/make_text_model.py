"""Build the text-mode model directory offline: a 32k byte-level BPE tokenizer trained on text
this machine has (Debian's /usr/share/doc and the Python standard library's sources), next to
a Llama-2-7B-shaped ``config.json``, plus ``corpus.txt.gz``, the text the bench's text prompts
are cut from (bench/workload.py). Weights are never written: ``--load-format dummy``.

    python bench/gpu/make_text_model.py                 # -> bench/gpu/llama-2-7b-text/
    python bench/gpu/make_text_model.py --tiny DIR      # the same tokenizer and corpus on the
                                                        # tiny model's dimensions (CPU tests)

The committed directory was made by the first form here (Debian 12, Python 3.11; about a
minute on two cores). The corpus files are read in sorted order, so the training text is
fixed for one machine; the device never retrains, it loads the committed files.
"""

from __future__ import annotations

import argparse
import gzip
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

HERE = Path(__file__).resolve().parent
TEXT_MODEL_DIR = HERE / "llama-2-7b-text"
VOCAB_SIZE = 32000
SPECIALS = ["<unk>", "<s>", "</s>"]
"""Llama-2's ids: <unk> 0, <s> 1, </s> 2."""
TRAIN_BYTES = 24_000_000
"""Training text (enough for a 32k vocabulary; more only slows the training)."""
PROMPT_CORPUS_BYTES = 1_500_000
"""Text the prompts are cut from: ~400k tokens, so 3,000 prompts of 256 tokens rarely
overlap much (and never share a 16-token prefix block but by chance)."""
DOC_SOURCES = ("/usr/share/doc",)
CODE_SOURCES = ("/usr/lib/python3.11", "/usr/lib/python3.12", "/usr/lib/python3")
DOC_NAMES = (".txt", ".md", ".rst", "README", "NEWS", "changelog", "copyright")

LLAMA_2_7B: dict[str, object] = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama",
    "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 32, "hidden_act": "silu",
    "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
    "tie_word_embeddings": False, "torch_dtype": "float16", "initializer_range": 0.02,
    "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": None, "vocab_size": VOCAB_SIZE,
}
"""meta-llama/Llama-2-7b-hf's config.json (the vocabulary is ours, the same size)."""


def _read(path: Path) -> str:
    try:
        data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile):
        return ""
    if b"\0" in data[:4096]:
        return ""  # binary
    return data.decode("utf-8", errors="ignore")


def _files(roots: tuple[str, ...], doc: bool) -> list[Path]:
    out: list[Path] = []
    for root in roots:
        base = Path(root)
        if not base.is_dir():
            continue
        for p in sorted(base.rglob("*")):
            if not p.is_file() or p.is_symlink():
                continue
            name = p.name.removesuffix(".gz")
            wanted = (any(k in name for k in DOC_NAMES) if doc
                      else name.endswith(".py") and "/test" not in str(p))
            if wanted:
                out.append(p)
    return out


def _texts(files: list[Path], budget: int) -> Iterator[str]:
    used = 0
    for p in files:
        text = _read(p)
        if not text.strip():
            continue
        yield text
        used += len(text)
        if used >= budget:
            return


def prompt_corpus() -> str:
    """Prose for the prompts: every third documentation file until the budget is met."""
    docs = _files(DOC_SOURCES, doc=True)[::3]
    out: list[str] = []
    size = 0
    for text in _texts(docs, PROMPT_CORPUS_BYTES):
        out.append(text)
        size += len(text)
    return "\n\n".join(out)[:PROMPT_CORPUS_BYTES]


def train_tokenizer(out: Path) -> int:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    docs = _files(DOC_SOURCES, doc=True)
    code = _files(CODE_SOURCES, doc=False)
    half = TRAIN_BYTES // 2
    tok.train_from_iterator([*_texts(docs, half), *_texts(code, half)], trainer)
    # Llama-2 puts <s> in front of every prompt; vLLM's tokenizer call does so through this.
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    tok.save(str(out / "tokenizer.json"), pretty=False)
    return int(tok.get_vocab_size())


def write_tokenizer_config(out: Path) -> None:
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "model_max_length": 4096, "clean_up_tokenization_spaces": False,
    }, indent=1) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}, indent=1) + "\n")
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 1, "eos_token_id": 2}, indent=1) + "\n")


def make_text_model(out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    vocab = train_tokenizer(out)
    if vocab != VOCAB_SIZE:
        raise SystemExit(f"trained {vocab} tokens, not {VOCAB_SIZE}: too little text")
    write_tokenizer_config(out)
    (out / "config.json").write_text(json.dumps(LLAMA_2_7B, indent=1) + "\n")
    with gzip.GzipFile(out / "corpus.txt.gz", "wb", mtime=0) as f:
        f.write(prompt_corpus().encode())
    return out


def make_tiny_text_model(out: Path, source: Path = TEXT_MODEL_DIR) -> Path:
    """The committed tokenizer and corpus on the tiny model's shape (vocab 32000): the CPU
    stand-in for the 7B text model."""
    from worker.engines.tiny_model import TINY_CONFIG

    out.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                 "generation_config.json", "corpus.txt.gz"):
        shutil.copyfile(source / name, out / name)
    config = {**TINY_CONFIG, "vocab_size": VOCAB_SIZE, "bos_token_id": 1, "eos_token_id": 2,
              "max_position_embeddings": 2048}
    (out / "config.json").write_text(json.dumps(config, indent=1) + "\n")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=TEXT_MODEL_DIR)
    ap.add_argument("--tiny", type=Path, help="write the tiny-shaped copy here instead")
    a = ap.parse_args()
    done = make_tiny_text_model(a.tiny) if a.tiny else make_text_model(a.out)
    for p in sorted(done.iterdir()):
        print(f"{p.stat().st_size:>10,}  {p}")


if __name__ == "__main__":
    main()
