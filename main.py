"""mimo-jax command line. Flags are parsed here; everything else is a library call.

Progress is printed; absl INFO logs (the checkpointing library's included) appear with
--verbosity=0. A mistake in the flags, the config or the files ends with one line on stderr;
--verbosity=1 shows the traceback of every error.

python main.py --config=configs/tiny.py --workdir=runs/tiny        # train (default)
python main.py --mode=eval --config=configs/tiny.py --workdir=runs/tiny
python main.py --mode=sft --config=configs/rl_tiny.py --workdir=runs/sft_tiny
python main.py --mode=rl --config=configs/rl_tiny.py --workdir=runs/rl_tiny     # SFT warm-up + RL
python main.py --mode=mopd --config=configs/mopd_tiny.py --workdir=runs/mopd    # distil teachers
python main.py --mode=rl --config=configs/agent_tiny.py --workdir=runs/agent_tiny  # agentic RL
python main.py --mode=episode --config=configs/agent_tiny.py --workdir=runs/agent_tiny
python main.py --mode=generate --workdir=runs/tiny --prompt='def ' --num_draft_tokens=3
python main.py --mode=generate --workdir=runs/imported --chat --prompt='Hello'
python main.py --mode=import_hf --hf_dir=HF_DIR --workdir=runs/imported
python main.py --mode=export_hf --workdir=runs/imported --hf_dir=OUT_DIR
python main.py --mode=generate --hf_dir=HF_DIR --config.mesh.shape=1,2,2,2 \
    --config.mesh.rules=decode --chat --prompt='Hello'

generate and import_hf run on a device mesh when the command line names one (--config, or any
--config.mesh.* override): the model is loaded (load_hf) or restored straight into the rules'
sharded layout; otherwise on the default device. generate reads the model and tokenizer from
--hf_dir if given, else from --workdir.
"""

import codecs
import contextlib
import os
import shutil
import sys

import jax
import numpy as np
from absl import app, flags, logging
from flax import nnx
from ml_collections import config_flags

import mimo_jax
import process_setup
from mimo_jax import chat, checkpoint, data, hf, sharding, train
from mimo_jax.generate import generate
from mimo_jax.post_training import mopd, rl, sft
from mimo_jax.post_training.agent import episodes

PROG = "main.py"
MODES = ("train", "eval", "generate", "import_hf", "export_hf", "sft", "rl", "mopd", "episode")
# A hub directory's tokenizer: vocabulary, special tokens, chat template, stop ids.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json", chat.TEMPLATE_FILE)  # fmt: skip

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Run directory: model config, checkpoints, metrics.")
flags.DEFINE_enum("mode", "train", MODES, "What to do.")
flags.DEFINE_string(
    "hf_dir", None, "HF checkpoint directory (import and generate source, export target)."
)
flags.DEFINE_enum("param_dtype", None, ["float32", "bfloat16"], "Import: storage dtype override.")
flags.DEFINE_bool("overwrite", False, "Export: replace an existing --hf_dir.")
flags.DEFINE_string("prompt", "def ", "Generate: the prompt text.")
flags.DEFINE_bool("chat", False, "Generate: --prompt is a user message in the chat template.")
flags.DEFINE_integer("max_new_tokens", 200, "Generate: tokens to generate.")
flags.DEFINE_float("temperature", 0.0, "Generate: 0 is greedy.")
flags.DEFINE_integer("top_k", 0, "Generate: top-k filter (0 = off).")
flags.DEFINE_float("top_p", 1.0, "Generate: nucleus mass (1 = off).")
flags.DEFINE_integer("num_draft_tokens", 0, "Generate: MTP draft tokens per step (0..3).")
flags.DEFINE_integer("seed", 0, "Generate: sampling seed.")
flags.DEFINE_integer("task_index", 0, "Episode: which held-out agent task to play.")
flags.DEFINE_bool(
    "distributed",
    False,
    "Multi-host: call jax.distributed.initialize() (auto-detected on "
    "TPU pods, SLURM, Open MPI; or give --coordinator_address etc.).",
)
flags.DEFINE_string("coordinator_address", None, "Multi-host: host:port of process 0.")
flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes.")
flags.DEFINE_integer("process_id", None, "Multi-host: this process's index.")
with process_setup.exit_on_flag_error(PROG):  # without --config, the default loads here
    config_flags.DEFINE_config_file("config", "configs/tiny.py", "ml_collections config file.")


def import_hf(hf_dir: str, workdir: str, param_dtype: str | None = None) -> None:
    """HF checkpoint -> workdir (model_config.json + orbax checkpoint at step 0).

    Under a mesh (``_mesh_from_flags``) the model is loaded sharded and every process writes
    its own shards; process 0 writes the config and tokenizer files.
    """
    overrides = {} if param_dtype is None else {"param_dtype": param_dtype}
    ckpt = checkpoint.Checkpointer(workdir)
    try:
        if ckpt.latest_step() is not None:
            raise FileExistsError(f"{workdir} already holds checkpoints; import into a new workdir")
        with _mesh_from_flags():
            model = _load_hf(hf_dir, **overrides)
            if jax.process_index() == 0:
                checkpoint.save_model_config(workdir, model.cfg)
                for name in TOKENIZER_FILES:
                    if os.path.exists(os.path.join(hf_dir, name)):
                        shutil.copy(os.path.join(hf_dir, name), os.path.join(workdir, name))
            ckpt.save(0, model)
    finally:
        ckpt.close()
    print(f"imported {hf_dir} -> {workdir}")


def show_episode(config, workdir: str, index: int) -> None:
    """Prints the workdir's policy's greedy episode on a held-out agent task."""
    if not episodes.is_agent(config):
        raise ValueError('--mode=episode needs an agent config (config.task.name="agent")')
    tokenizer = data.load_tokenizer(config.data.tokenizer or None)
    episode = episodes.example_episode(config, _restore(workdir), tokenizer, index)
    print(episodes.format_episode(episode))


def export_hf(workdir: str, hf_dir: str, overwrite: bool = False) -> None:
    """Workdir's latest checkpoint -> HF checkpoint directory; under a mesh named on the command
    line the checkpoint is restored sharded and gathered one tensor at a time (``hf.save_hf``)."""
    with _mesh_from_flags():
        hf.save_hf(_restore(workdir), hf_dir, overwrite=overwrite)
    if jax.process_index() == 0:
        print(f"exported {workdir} -> {hf_dir}")


def _mesh_from_flags():
    """``sharding.use_mesh`` of the config's mesh and rules if the command line names a mesh
    (``--config`` or a ``--config.mesh.*`` override), else a context that changes nothing."""
    named = config_flags.get_override_values(FLAGS["config"])
    if not (FLAGS["config"].present or any(k.startswith("mesh.") for k in named)):
        return contextlib.nullcontext()
    mesh = sharding.make_mesh(tuple(FLAGS.config.mesh.shape))
    return sharding.use_mesh(mesh, FLAGS.config.mesh.rules)


def _load_hf(hf_dir: str, **overrides) -> mimo_jax.MiMoV2Flash:
    """``hf.load_hf`` (sharded under a current mesh), refusing a directory without config.json."""
    if not os.path.isfile(os.path.join(hf_dir, "config.json")):
        raise FileNotFoundError(f"--hf_dir={hf_dir} has no config.json: not a HF checkpoint")
    return hf.load_hf(hf_dir, **overrides)


def _restore(workdir: str) -> mimo_jax.MiMoV2Flash:
    """The workdir's latest checkpoint, restored into the current mesh's sharded layout (one
    device without a mesh)."""
    if jax.sharding.get_mesh().empty:
        return checkpoint.load_model(workdir)
    cfg = checkpoint.load_model_config(workdir)
    model = nnx.eval_shape(lambda: mimo_jax.MiMoV2Flash(cfg, rngs=nnx.Rngs(0)))
    state = nnx.state(model)
    sharding.check_divisible(state, jax.sharding.get_mesh())
    targets = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        state,
        sharding.state_shardings(model),
    )
    nnx.update(model, targets)
    ckpt = checkpoint.Checkpointer(workdir)
    try:
        ckpt.restore(model)
    finally:
        ckpt.close()
    return model


def generate_text(workdir: str | None, hf_dir: str | None = None) -> str:
    """Loads the model and tokenizer of ``hf_dir`` (a HF checkpoint) or else ``workdir`` (its
    tokenizer.json if present, else bytes), on the mesh the flags name if any, and prints a
    continuation of --prompt; with --chat, the reply to --prompt as one user message of the
    directory's chat template. Generation stops at any of the directory's stop ids (the
    tokenizer's EOS and generation_config.json's), else at the model config's EOS."""
    directory = hf_dir or workdir
    has_tokenizer = os.path.exists(os.path.join(directory, TOKENIZER_FILES[0]))
    tokenizer = data.load_tokenizer(directory if has_tokenizer else None)
    shown = FLAGS.prompt
    if FLAGS.chat:  # before the model loads: a directory without a template fails at once
        template = chat.ChatTemplate.from_dir(directory)
        tokenizer = template.tokenizer
        ids = template.encode([{"role": "user", "content": FLAGS.prompt}])
        shown = ""  # the reply only, not the template's markup
    else:
        ids = tokenizer.encode(FLAGS.prompt)
    if len(ids) == 0:
        raise ValueError("--prompt must not be empty")
    with _mesh_from_flags():
        model = _load_hf(hf_dir) if hf_dir else _restore(workdir)
        stops = getattr(tokenizer, "stop_ids", ()) or model.cfg.eos_token_id
        return _stream_generation(model, tokenizer, ids, shown, stops)


def _stream_generation(model, tokenizer, ids, shown: str, stops) -> str:
    """Runs ``generate`` with the sampling flags, printing ``shown`` and then the new text as the
    device loop commits it, and a summary line; returns the new text."""
    utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
    started = []

    def stream(new_tokens):  # printed as the device loop commits them
        if not started:  # the prompt first, once generate has accepted the arguments
            sys.stdout.write(shown)
            started.append(True)
        sys.stdout.write(utf8.decode(tokenizer.decode_bytes(new_tokens)))
        sys.stdout.flush()

    res = generate(
        model,
        np.asarray(ids)[None],
        max_new_tokens=FLAGS.max_new_tokens,
        temperature=FLAGS.temperature,
        top_k=FLAGS.top_k,
        top_p=FLAGS.top_p,
        num_draft_tokens=FLAGS.num_draft_tokens,
        eos_token_id=stops,
        seed=FLAGS.seed,
        stream=stream,
    )
    stream(np.zeros(0, np.int32))  # the prompt, if nothing was generated
    sys.stdout.write(utf8.decode(b"", final=True) + "\n")
    new = np.asarray(res.tokens[0, len(ids) : int(res.lengths[0])])
    text = tokenizer.decode(new)
    print(
        f"[{len(new)} tokens, {int(res.num_steps)} steps, mean accepted length "
        f"{float(res.mean_accepted_length):.2f}]"
    )
    return text


def _parse_flags(argv: list[str]) -> list[str]:
    with process_setup.exit_on_flag_error(PROG):
        rest = FLAGS(argv)
        FLAGS.config.keys()  # loads --config and applies its overrides now
    return rest


def main(argv):
    process_setup.quiet_logs()
    with process_setup.exit_on_user_error(PROG):
        run(argv)


def run(argv):
    if len(argv) > 1:
        raise ValueError(f"unexpected arguments: {argv[1:]}")
    if FLAGS.mode in ("import_hf", "export_hf") and not FLAGS.hf_dir:
        raise ValueError(f"--mode={FLAGS.mode} needs --hf_dir")
    if not FLAGS.workdir and not (FLAGS.mode == "generate" and FLAGS.hf_dir):
        either = " or --hf_dir" if FLAGS.mode == "generate" else ""
        raise ValueError(f"--mode={FLAGS.mode} needs --workdir{either}")
    if FLAGS.mode in ("train", "eval", "sft", "rl", "mopd") and FLAGS.config.keep_freed_memory:
        process_setup.keep_freed_memory()  # before the backend starts its threads
    if FLAGS.distributed or FLAGS.coordinator_address:
        # Before anything touches a device: every process then sees the global device list.
        jax.distributed.initialize(
            coordinator_address=FLAGS.coordinator_address,
            num_processes=FLAGS.num_processes,
            process_id=FLAGS.process_id,
        )
    logging.info("jax %s, process %d/%d, devices %s", jax.__version__, jax.process_index(),
                 jax.process_count(), jax.devices())  # fmt: skip
    if FLAGS.mode == "train":
        train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    elif FLAGS.mode == "sft":
        sft.run(FLAGS.config, FLAGS.workdir)
    elif FLAGS.mode == "rl":
        rl.run(FLAGS.config, FLAGS.workdir)
    elif FLAGS.mode == "mopd":
        mopd.run(FLAGS.config, FLAGS.workdir)
    elif FLAGS.mode == "eval":
        metrics = train.eval_only(FLAGS.config, FLAGS.workdir)
        print(" ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items())))
    elif FLAGS.mode == "generate":
        generate_text(FLAGS.workdir, FLAGS.hf_dir)
    elif FLAGS.mode == "import_hf":
        import_hf(FLAGS.hf_dir, FLAGS.workdir, FLAGS.param_dtype)
    elif FLAGS.mode == "export_hf":
        export_hf(FLAGS.workdir, FLAGS.hf_dir, FLAGS.overwrite)
    elif FLAGS.mode == "episode":
        show_episode(FLAGS.config, FLAGS.workdir, FLAGS.task_index)


if __name__ == "__main__":
    jax.config.config_with_absl()
    app.run(main, flags_parser=_parse_flags)
