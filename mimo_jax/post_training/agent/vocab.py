"""The agent suite's BPE tokenizer: names and code lines in a few tokens, turns ended by EOS.

A byte-level model has to copy a buggy line from a tool's output into its ``str_replace``
call one byte at a time, ~15-30 steps each depending on the one before; with this tokenizer
the same line is ~5 tokens (``"   "``, ``" return"``, ``" d"``, ``" -"``, ``" 8"``) and an
episode ~170 tokens instead of ~470 bytes, so SFT and RL steps are cheaper too.

* Byte-level BPE (``tokenizers``), trained on the scripted episodes of the *training* tasks
  only, with every byte in its alphabet, so any text (a sampled turn, an error message) still
  encodes.
* Pre-tokenisation isolates ``"\\n"`` before the byte-level split: a line of a file and the same
  line inside ``<old>...</old>`` become the same tokens, and no token spans the boundary
  between a tool's output (which ends with ``"\\n"``) and the next model turn, so a context
  tokenised whole equals the rollout's piecewise tokens (tests/test_agent_vocab.py).
* ``EOS`` (``<|end|>``) ends a model turn: ``tokenizer_config.json`` names it ``eos_token``, so
  ``data.HFTokenizer.from_dir`` makes it the rollouts' stop token and the SFT end token.

``configs/agent_tokenizer/`` holds the tokenizer ``configs/agent_tiny.py`` uses; rebuild it with
``python -m mimo_jax.post_training.agent.vocab --out=configs/agent_tokenizer``.
"""

import json
import os
import shutil
import tempfile

from absl import app, flags

from mimo_jax.post_training.agent import repos, trajectories

EOS = "<|end|>"
VOCAB_SIZE = 512  # the suite's text saturates here: more merges would cross pre-token bounds
TRAIN_TASKS = 2400
SEED = 0


def train(num_tasks: int = TRAIN_TASKS, vocab_size: int = VOCAB_SIZE, seed: int = SEED):
    """Trains the tokenizer on scripted episodes of ``repos.suite("train", num_tasks, seed)``.

    Args:
      num_tasks: training tasks whose scripted episodes are the corpus.
      vocab_size: vocabulary size, ``EOS`` and the 256 byte symbols included.
      seed: the suite's seed.

    Returns:
      a ``tokenizers.Tokenizer``; training is deterministic for a given corpus.
    """
    import tokenizers  # noqa: PLC0415  (only the agent runs need it)
    from tokenizers import decoders, models, pre_tokenizers, trainers  # noqa: PLC0415

    texts = [
        "".join(text for _, text in trajectories.scripted_episode(t))
        for t in repos.suite("train", num_tasks, seed=seed)
    ]
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(tokenizers.Regex(r"\n"), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return tok


def save(tok, out_dir: str) -> None:
    """Writes ``tokenizer.json`` and ``tokenizer_config.json`` (EOS named) into ``out_dir``.

    The directory is written beside its destination and renamed into place, so a failed write
    leaves the old one (or none), never half of one.
    """
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=".vocab-")
    try:
        tok.save(os.path.join(tmp, "tokenizer.json"))
        with open(os.path.join(tmp, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump({"eos_token": EOS}, f, indent=2)
            f.write("\n")
        if os.path.exists(out_dir):
            shutil.rmtree(out_dir)
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def main(argv):
    del argv
    save(train(), flags.FLAGS.out)
    print(f"wrote {flags.FLAGS.out}")


if __name__ == "__main__":
    flags.DEFINE_string("out", "configs/agent_tokenizer", "output directory")
    app.run(main)
