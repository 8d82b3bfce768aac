"""Build small, offline Llama models for the bundled repository, tests and benchmarks.

No model can be downloaded on the machines this project is developed and tested on, so the
bundled repository ships model *recipes*, and this module turns a recipe into a real Hugging
Face model folder: `config.json`, seeded random weights from transformers' own initialisation
saved as safetensors (the engine runs its real loading path), and a byte-level tokenizer built
with the `tokenizers` library, chat template included. The weights are random: outputs are
gibberish, but compute, memory and every serving code path are those of a real model.

    python -m llumnix_backend.tiny_models OUT_DIR [--hidden-size 256] [--layers 2] [--seed 0]

Imports torch, transformers and tokenizers lazily: they come with the engine extra.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from pathlib import Path

# 256 byte tokens, then the special tokens, then unused fillers so the vocabulary size is a
# multiple of 64 (kernel-friendly); every id the model can emit decodes to something.
_SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")
_VOCAB_SIZE = 320

# A plain chat template: role headers and an end-of-turn marker the tokenizer knows. Tools are
# shown and called in the Hermes format (vLLM's `hermes` tool parser reads it).
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if tools %}<|system|>\nTools you may call, each call as <tool_call>{\"name\": ..., \"arguments\": ...}"
    "</tool_call>:\n{% for tool in tools %}{{ tool | tojson }}\n{% endfor %}{{ eos_token }}\n{% endif %}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}"
    "{% for call in message.get('tool_calls') or [] %}<tool_call>"
    "{{ {'name': call['function']['name'], 'arguments': call['function']['arguments']} | tojson }}</tool_call>"
    "{% endfor %}{{ eos_token }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@dataclass(frozen=True)
class TinyLlamaRecipe:
    """What a generated model looks like. Head size must suit the CPU attention backend."""

    hidden_size: int = 256
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 4
    intermediate_size: int = 512
    max_position_embeddings: int = 8192
    seed: int = 0
    # The dtype the CPU engine runs: weights saved in float32 are cast at every engine start,
    # with a warning per engine.
    dtype: str = "bfloat16"


def build_tokenizer(out_dir: Path, vocab_size: int = _VOCAB_SIZE) -> None:
    """Write a byte-level BPE tokenizer with no merges: one token per UTF-8 byte."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel

    byte_symbols = sorted(ByteLevel.alphabet())
    vocab = {tok: i for i, tok in enumerate(_SPECIAL_TOKENS)}
    for symbol in byte_symbols:
        vocab[symbol] = len(vocab)
    fillers = [f"<extra_{i}>" for i in range(vocab_size - len(vocab))]
    for filler in fillers:
        vocab[filler] = len(vocab)

    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(list(_SPECIAL_TOKENS) + fillers)
    tokenizer.save(str(out_dir / "tokenizer.json"))

    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "add_bos_token": False,
        "model_max_length": 1_000_000,
        "chat_template": CHAT_TEMPLATE,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    special_map = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2))


def build_model(out_dir: str | Path, recipe: TinyLlamaRecipe = TinyLlamaRecipe()) -> Path:
    """Create (or overwrite) a model folder from `recipe`; returns its path."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(
        vocab_size=_VOCAB_SIZE,
        hidden_size=recipe.hidden_size,
        intermediate_size=recipe.intermediate_size,
        num_hidden_layers=recipe.num_layers,
        num_attention_heads=recipe.num_heads,
        num_key_value_heads=recipe.num_kv_heads,
        max_position_embeddings=recipe.max_position_embeddings,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
        torch_dtype=recipe.dtype,
    )
    torch.manual_seed(recipe.seed)
    model = LlamaForCausalLM(config).to(getattr(torch, recipe.dtype))
    model.save_pretrained(out, safe_serialization=True)
    build_tokenizer(out)
    (out / "recipe.json").write_text(json.dumps(asdict(recipe), indent=2))
    return out


# One 16-token KV block of Llama-2-7B: 32 layers x (K, V) x 4,096 x 2 bytes (bf16) x 16 tokens.
LLAMA_2_7B_BLOCK_BYTES = 32 * 2 * 4096 * 2 * 16


def write_llama_2_7b_shape(out_dir: str | Path, max_position_embeddings: int = 8192) -> Path:
    """A folder with Llama-2-7B's architecture and no weights, for engines started with
    `load_format: dummy` (GPU benchmarks): compute and KV-cache size are the real model's.
    The context is longer than Llama-2's 4,096 so that 4,096-token sequences can keep decoding."""
    from transformers import LlamaConfig

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    LlamaConfig(
        vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=max_position_embeddings,
        bos_token_id=1, eos_token_id=2, tie_word_embeddings=False, torch_dtype="bfloat16",
    ).save_pretrained(out)
    build_tokenizer(out, vocab_size=32000)
    return out


def ensure_model(out_dir: str | Path, recipe: TinyLlamaRecipe = TinyLlamaRecipe()) -> Path:
    """Build the model unless the folder already holds one made from the same recipe."""
    out = Path(out_dir)
    recipe_file = out / "recipe.json"
    if recipe_file.exists() and json.loads(recipe_file.read_text()) == asdict(recipe):
        if (out / "model.safetensors").exists() and (out / "tokenizer.json").exists():
            if _chat_template(out) != CHAT_TEMPLATE:
                build_tokenizer(out)  # (the weights stay: only the template changed)
            return out
    return build_model(out, recipe)


def _chat_template(model_dir: Path) -> str | None:
    try:
        return json.loads((model_dir / "tokenizer_config.json").read_text()).get("chat_template")
    except (OSError, ValueError):
        return None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path)
    defaults = TinyLlamaRecipe()
    parser.add_argument("--hidden-size", type=int, default=defaults.hidden_size)
    parser.add_argument("--layers", type=int, default=defaults.num_layers)
    parser.add_argument("--heads", type=int, default=defaults.num_heads)
    parser.add_argument("--intermediate-size", type=int, default=defaults.intermediate_size)
    parser.add_argument("--max-positions", type=int, default=defaults.max_position_embeddings)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    args = parser.parse_args(argv)
    recipe = TinyLlamaRecipe(
        hidden_size=args.hidden_size,
        num_layers=args.layers,
        num_heads=args.heads,
        num_kv_heads=args.heads,
        intermediate_size=args.intermediate_size,
        max_position_embeddings=args.max_positions,
        seed=args.seed,
    )
    path = ensure_model(args.out_dir, recipe)
    print(f"model ready: {path}")


if __name__ == "__main__":
    main()
