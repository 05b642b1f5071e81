"""A synthetic checkpoint in the hub's format for ``05_checkpoint_on_a_mesh`` (no download).

The weights are random: what matches the release is the format. Linear weights (attention
q / k / v, FFN and expert gate / up / down, the MTP ``eh_proj``) are FP8 e4m3 with float32
``weight_scale_inv`` per 128 x 128 block (ragged at the edges), the other tensors bf16, spread
over several safetensors files with an index; beside them a byte-level BPE tokenizer in Qwen2's
layout with ChatML special tokens and a chat template in ``tokenizer_config.json``, and
``generation_config.json`` with the stop ids.
"""

import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import tokenizers
from flax import nnx
from safetensors.numpy import save_file
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

import mimo_jax
from mimo_jax import fp8, hf, hf_slices

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Qwen2's pre-tokenizer split.
QWEN2_SPLIT = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
    r"""\s*[\r\n]+|\s+(?!\S)|\s+"""
)


def random_model(cfg: mimo_jax.ModelConfig, seed: int = 0) -> mimo_jax.MiMoV2Flash:
    """A model with every parameter drawn at random (norm scales near 1).

    Filled from numpy into an abstract model: building it eagerly would compile one small XLA
    program per initialiser shape.

    Args:
      cfg: the model config.
      seed: numpy seed.

    Returns:
      The model, on the default device.
    """
    graphdef, state = nnx.split(nnx.eval_shape(lambda: mimo_jax.MiMoV2Flash(cfg, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(seed)
    flat = nnx.to_flat_state(state)
    for path, var in flat:
        kind = path[-1]
        if kind == "scale":
            x = 1.0 + 0.2 * rng.standard_normal(var.shape, np.float32)
        else:
            std = {"sinks": 0.5, "bias": 0.1}.get(kind, cfg.initializer_range)
            x = std * rng.standard_normal(var.shape, np.float32)
        var.set_value(jnp.asarray(x, var.dtype))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def write_checkpoint(cfg: mimo_jax.ModelConfig, path: str, seed: int = 0, num_files: int = 4):
    """Writes the hub-format checkpoint of a random ``cfg`` model into a new directory ``path``.

    Args:
      cfg: the model config (``param_dtype`` bfloat16, as the release stores its other tensors).
      path: the directory to create.
      seed: the weights' seed.
      num_files: safetensors files, tensors spread round-robin, with an index.
    """
    staging = path + ".bf16"
    hf.save_hf(random_model(cfg, seed), staging)  # the bf16 export, read back one tensor at a time
    source = hf_slices.Checkpoint(staging)
    os.makedirs(path)
    names = sorted(source.meta)
    weight_map = {}
    for i in range(num_files):
        fname = f"model-{i + 1:05d}-of-{num_files:05d}.safetensors"
        part = {}
        for name in names[i::num_files]:
            x = source.read_box(name, (slice(None),) * len(source.shape(name)))
            if fp8.RELEASE_FP8.search(name):
                part[name], part[fp8.scale_name(name)] = fp8.quantize_fp8(x.astype(np.float32))
            else:
                part[name] = x
        save_file(part, os.path.join(path, fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, fname))
    with open(os.path.join(path, hf.INDEX_FILE), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f, indent=1)
    shutil.copy(os.path.join(staging, "config.json"), path)
    shutil.rmtree(staging)


def qwen2_bpe(
    corpus: list[str], vocab_size: int, specials: list[str] = SPECIALS
) -> tokenizers.Tokenizer:
    """A byte-level BPE trained on ``corpus`` in Qwen2's pipeline (NFC, Qwen2's split, byte
    level), which transformers' Qwen2Tokenizer rebuilds from the vocabulary and merges.

    Args:
      corpus: training text.
      vocab_size: tokens, special tokens included.
      specials: the special tokens, first in the vocabulary.

    Returns:
      The trained tokenizer.
    """
    tok = tokenizers.Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    split = pre_tokenizers.Split(tokenizers.Regex(QWEN2_SPLIT), behavior="isolated")
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus, trainer)
    return tok


def write_tokenizer(path: str, corpus: list[str], vocab_size: int = 400) -> None:
    """Writes a Qwen2-layout tokenizer with a ChatML chat template into directory ``path``.

    Args:
      path: an existing directory (the checkpoint's).
      corpus: text the byte-level BPE is trained on.
      vocab_size: tokens, special tokens included (at most the model's vocabulary).
    """
    tok = qwen2_bpe(corpus, vocab_size)
    tok.save(os.path.join(path, "tokenizer.json"))
    config = {
        "tokenizer_class": "Qwen2Tokenizer",
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "add_bos_token": False,
        "chat_template": CHATML,
    }
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=1)
    eos_ids = [tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")]
    with open(os.path.join(path, "generation_config.json"), "w") as f:
        json.dump({"eos_token_id": eos_ids}, f)
