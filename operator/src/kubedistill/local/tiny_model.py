"""A tiny random-weight Llama with a real SentencePiece tokenizer: the student of `--preset smoke`, and of
tests and benchmarks (DESIGN §5).

Hidden 256 and FFN 1024 are multiples of 256 (the k-quant block), so llama.cpp quantises every
matrix to q4_k_m without falling back to another type. The tokenizer is a SentencePiece BPE model
with byte fallback (any text encodes), trained in about a second on a generated corpus, and saved
both as `tokenizer.model` (what llama.cpp's converter reads) and as the transformers files.

    build_tiny_llama(dest) -> dest          build into a directory
    tiny_llama() -> cached path             ~/.cache/kubedistill/tiny-llama-<recipe hash>/
    python -m kubedistill.local.tiny_model DEST
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import shutil
import sys
import tempfile
from pathlib import Path

HIDDEN = 256
INTERMEDIATE = 1024
LAYERS = 2
HEADS = 4
VOCAB_TARGET = 1024
MAX_POSITIONS = 2048
SEED = 1234

# Roles are plain words so the template tokenises with any vocabulary; eos after each turn teaches
# (and lets llama.cpp see) where an answer ends.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '### ' + message['role'] + ':\\n' + message['content'] + eos_token + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '### assistant:\\n' }}{% endif %}"
)

_RECIPE = json.dumps(
    [HIDDEN, INTERMEDIATE, LAYERS, HEADS, VOCAB_TARGET, MAX_POSITIONS, SEED, CHAT_TEMPLATE, "v1"]
)

_WORDS = [
    "the",
    "a",
    "an",
    "of",
    "to",
    "in",
    "is",
    "are",
    "was",
    "what",
    "which",
    "how",
    "why",
    "when",
    "where",
    "who",
    "answer",
    "question",
    "model",
    "student",
    "teacher",
    "number",
    "sum",
    "total",
    "capital",
    "city",
    "country",
    "river",
    "language",
    "code",
    "python",
    "function",
    "return",
    "value",
    "list",
    "string",
    "json",
    "key",
    "true",
    "false",
    "yes",
    "no",
    "because",
    "therefore",
    "first",
    "second",
    "third",
    "add",
    "subtract",
    "multiply",
    "divide",
    "equals",
    "please",
    "explain",
    "briefly",
    "short",
    "long",
    "good",
    "bad",
    "small",
    "large",
    "fast",
    "slow",
    "data",
    "train",
    "test",
    "score",
    "judge",
    "prompt",
    "system",
    "user",
    "assistant",
    "hello",
    "world",
    "paris",
    "london",
    "berlin",
    "rome",
    "madrid",
    "tokyo",
    "water",
    "fire",
    "earth",
    "air",
]


def _corpus(lines: int, rng: random.Random) -> list[str]:
    """Sentences of real words, numbers, made-up syllable words and punctuation, so BPE finds merges."""
    syllables = ["ka", "lo", "mi", "ne", "ru", "ta", "shi", "ven", "dor", "pa", "qu", "ex", "zy", "ba", "to"]
    out = []
    for _ in range(lines):
        words = []
        for _ in range(rng.randint(4, 14)):
            roll = rng.random()
            if roll < 0.6:
                words.append(rng.choice(_WORDS))
            elif roll < 0.75:
                words.append(str(rng.randint(0, 999)))
            else:
                words.append("".join(rng.choice(syllables) for _ in range(rng.randint(1, 3))))
        sentence = " ".join(words)
        out.append(sentence[0].upper() + sentence[1:] + rng.choice([".", "?", "!", ":", ","]))
    return out


def _train_sentencepiece(dest: Path) -> None:
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus(6000, random.Random(SEED))),
        model_writer=model,
        model_type="bpe",
        vocab_size=VOCAB_TARGET,
        byte_fallback=True,
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    (dest / "tokenizer.model").write_bytes(model.getvalue())


def build_tiny_llama(dest: Path | str) -> Path:
    """Write a random-weight LlamaForCausalLM and its tokenizer into `dest` (created); return it."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaTokenizer

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    _train_sentencepiece(dest)
    tokenizer = LlamaTokenizer.from_pretrained(str(dest))
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(str(dest))

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=HEADS,
        max_position_embeddings=MAX_POSITIONS,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.eos_token_id
    model.save_pretrained(str(dest))
    return dest


def cache_root() -> Path:
    return Path(os.environ.get("KUBEDISTILL_CACHE", Path.home() / ".cache" / "kubedistill"))


def tiny_llama() -> Path:
    """The tiny model, built once per machine (per recipe) and reused; safe against concurrent builders."""
    digest = hashlib.sha256(_RECIPE.encode()).hexdigest()[:12]
    final = cache_root() / f"tiny-llama-{digest}"
    if (final / "config.json").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    try:
        build_tiny_llama(staging)
        try:
            staging.rename(final)
        except OSError:
            if not (final / "config.json").is_file():  # someone else won the race only if it is complete
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m kubedistill.local.tiny_model DEST", file=sys.stderr)
        return 2
    print(build_tiny_llama(args[0]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
