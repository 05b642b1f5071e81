"""Agentic RL on CPU: a tiny model fixes one-line bugs with bash / str_replace / finish.

``python main.py --mode=rl --config=configs/agent_tiny.py --workdir=runs/agent_tiny`` runs the
SFT warm-up on scripted successful episodes (into ``<workdir>/sft``), then GRPO on sampled
episodes with routing replay, rewarded by each repository's hidden tests. ``--mode=sft`` runs only
the warm-up. docs/agentic_rl.md explains the fields.
"""

import os

import ml_collections

from configs import rl_tiny

# The suite's BPE tokenizer (mimo_jax/post_training/agent/vocab.py): ~170 tokens per solved
# episode, a code line ~5 tokens, EOS ends a turn.
TOKENIZER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "agent_tokenizer")


def get_config():
    c = rl_tiny.get_config()
    # Fixing a bug means copying its line from a tool's output ~40-100 tokens back into the
    # str_replace call: more global layers and a context for a whole episode.
    c.data.tokenizer = TOKENIZER
    c.model.vocab_size = 512
    c.model.global_every = 2
    c.model.sliding_window = 32
    c.model.num_mtp_layers = 1
    c.model.max_position_embeddings = 320
    # Wider than rl_tiny, multi-head K/V: copying names and lines forms within ~1000 SFT steps
    # (half as many as at width 64 with one global K/V head).
    c.model.embed_dim = 128
    c.model.mlp_dim = 256
    c.model.moe_mlp_dim = 128
    c.model.num_kv_heads = 4
    c.model.swa_num_kv_heads = 4
    c.model.head_dim = 32
    c.model.v_head_dim = 32
    c.model.attention_impl = "xla"  # SFT packing keeps each example's attention to itself
    c.task.name = "agent"
    c.task.options = ml_collections.ConfigDict()

    c.agent = ml_collections.ConfigDict()
    c.agent.train_tasks = 2400  # SFT repositories (agent.repos.suite draws them)
    c.agent.rl_tasks = 2400  # RL repositories, drawn after the SFT ones: none seen in SFT
    c.agent.heldout_tasks = 128  # held-out solve rate: greedy episodes on these
    # ... and the mean over this many episodes per task sampled as RL samples (at rl.temperature):
    # the rate RL optimises, measured on tasks it never trains on.
    c.agent.heldout_samples = 4
    c.agent.max_context = 320  # tokens of one context (the token budget of an episode)
    c.agent.max_turn_tokens = 64  # a str_replace call of the suite is at most ~50 tokens
    c.agent.max_turns = 5  # the scripted solution takes 3, a recovery episode 4
    # SFT tasks that also get a recovery episode (a slipped str_replace, its error, the fix).
    # Off: at 0.5 the policy retries after an error but repeats its own failed line, and the
    # warm-up's held-out rate was lower (docs/agentic_rl.md, "Status").
    c.agent.recovery_share = 0.0
    c.agent.wall_s = 5.0  # wall-time limit of one bash command
    # Context management: summarise and restart when a context passes this fraction of
    # max_context (0: off). Off here: a solved episode fits in 230 tokens, and the SFT data has
    # no summaries to imitate; tests/test_agent_rollout.py covers it.
    c.agent.compact_fraction = 0.0
    c.agent.max_segments = 1  # contexts per episode (1 + compactions); sizes the batch
    c.agent.chunk = 16  # tokens per cache append of an observation
    c.agent.workers = 4  # threads stepping environments (sandboxed subprocesses)

    # SFT on every model turn of a scripted episode per training task (3 rows each).
    c.train.steps = 1000
    c.train.batch_size = 16
    c.train.seq_len = 256  # a solved episode is <= 230 tokens (a recovery episode ~300)
    c.train.lr = 3e-3
    c.train.warmup_steps = 30
    # Held-out episodes at the warm-up's end only: SFT's own are near 0 before step ~750, and
    # RL reuses the last as its step 0.
    c.train.eval_every = 1000
    c.train.checkpoint_every = 250
    c.sft.num_examples = 7200  # 3 turns x 2400 tasks (+ 2 per recovery episode)
    c.sft.packing = True

    c.rl.steps = 100
    c.rl.prompts_per_step = 6  # P tasks (8 sharpened the sampled policy less in 100 steps)
    c.rl.group_size = 8  # G episodes per task
    # Below 1: at 1.0 the SFT policy's samples slip on format tokens and few episodes succeed.
    c.rl.temperature = 0.7
    c.rl.num_draft_tokens = 0  # agent rollouts decode plainly
    c.rl.lr = 1e-4
    c.rl.heldout_every = 100  # start and end (128 greedy + 512 sampled episodes); 25 for a curve
    c.rl.checkpoint_every = 50
    return c
