"""Agentic RL on CPU: a tiny model fixes one-line bugs with bash / str_replace / finish.

``python main.py --mode=rl --config=configs/agent_tiny.py --workdir=runs/agent_tiny`` runs the
SFT warm-up on scripted successful episodes (into ``<workdir>/sft``), then GRPO on sampled
episodes with routing replay, rewarded by each repository's hidden tests. ``--mode=sft`` runs only
the warm-up. docs/post_training.md ("Agentic RL") explains the fields.
"""

import ml_collections

from configs import rl_tiny


def get_config():
    c = rl_tiny.get_config()
    # Fixing a bug means copying its line from a tool's output ~100-300 bytes back into the
    # str_replace call: more global layers (0, 1, 3) and a context for a whole episode.
    c.model.global_every = 2
    c.model.sliding_window = 32
    c.model.num_mtp_layers = 1
    c.model.max_position_embeddings = 768
    c.model.attention_impl = "xla"  # SFT packing keeps each example's attention to itself
    c.task.name = "agent"
    c.task.options = ml_collections.ConfigDict()

    c.agent = ml_collections.ConfigDict()
    c.agent.train_tasks = 2400  # training repositories (agent.repos.suite draws them)
    c.agent.heldout_tasks = 64  # held-out solve rate: greedy episodes on these
    c.agent.max_context = 768  # tokens of one context (the token budget of an episode)
    c.agent.max_turn_tokens = 160  # a str_replace call of the suite is at most ~130 bytes
    c.agent.max_turns = 4  # the scripted solution takes 3
    c.agent.wall_s = 5.0  # wall-time limit of one bash command
    # Context management: summarise and restart when a context passes this fraction of
    # max_context (0: off). Off here: a solved episode fits in 600 bytes, and the SFT data has
    # no summaries to imitate; tests/test_agent_rollout.py covers it.
    c.agent.compact_fraction = 0.0
    c.agent.max_segments = 1  # contexts per episode (1 + compactions); sizes the batch
    c.agent.chunk = 32  # tokens per cache append of an observation
    c.agent.workers = 4  # threads stepping environments (sandboxed subprocesses)

    # SFT on every model turn of a scripted episode per training task (3 rows each).
    c.train.steps = 400
    c.train.batch_size = 16
    c.train.seq_len = 640
    c.train.lr = 3e-3
    c.train.warmup_steps = 30
    c.train.eval_every = 200
    c.train.checkpoint_every = 100
    c.sft.num_examples = 7200  # 3 turns x 2400 tasks
    c.sft.packing = True

    c.rl.steps = 100
    c.rl.prompts_per_step = 8  # P tasks
    c.rl.group_size = 4  # G episodes per task
    c.rl.num_draft_tokens = 0  # agent rollouts decode plainly
    c.rl.lr = 1e-4
    c.rl.heldout_every = 25
    c.rl.checkpoint_every = 25
    return c
