"""Agent tasks in the post-training loops: SFT rows from scripted episodes, RL batches from
sampled ones, and the held-out solve rate.

A config whose ``task.name`` is ``"agent"`` (``configs/agent_tiny.py``) trains on
``repos.suite``'s repositories: ``--mode=sft`` on ``sft_examples`` (each model turn of a scripted
successful episode, with the context before it as the prompt), ``--mode=rl`` on episodes sampled
by ``rollout.run_episodes`` (``AgentSource``), scored by the hidden tests at ``finish``.
``config.agent`` holds the episode settings (docs/agentic_rl.md).
"""

import dataclasses
import functools

import jax.numpy as jnp
import ml_collections
import numpy as np

from mimo_jax.data import ByteTokenizer, Tokenizer
from mimo_jax.model import MiMoV2Flash
from mimo_jax.post_training import losses
from mimo_jax.post_training.agent import repos, trajectories
from mimo_jax.post_training.agent.env import AgentEnv, EnvConfig
from mimo_jax.post_training.agent.rollout import Episode, run_episodes
from mimo_jax.post_training.agent.sandbox import Limits
from mimo_jax.post_training.rollout import stop_token

NAME = "agent"
DOMAIN = "agent"
_HELDOUT_SEED = 1  # sampling seed of the held-out episodes (training seeds are per step)


def is_agent(config: ml_collections.ConfigDict) -> bool:
    """Whether the run's task is the agent task suite."""
    return "task" in config and config.task.name == NAME


def check_config(config: ml_collections.ConfigDict) -> None:
    """Raises ValueError naming the first bad ``config.agent`` field."""
    if "agent" not in config:
        raise ValueError('config.task.name="agent" needs a config.agent section '
                         "(configs/agent_tiny.py)")  # fmt: skip
    ac = config.agent
    for field in ("train_tasks", "rl_tasks", "heldout_tasks", "max_context", "max_turn_tokens",
                  "max_turns", "max_segments", "chunk", "workers"):  # fmt: skip
        if ac[field] < 1:
            raise ValueError(f"config.agent.{field}={ac[field]} must be >= 1")
    if not 0 <= ac.recovery_share <= 1:
        raise ValueError(f"config.agent.recovery_share={ac.recovery_share}: in [0, 1]")
    if not 0 <= ac.compact_fraction < 1:
        raise ValueError(f"config.agent.compact_fraction={ac.compact_fraction}: in [0, 1), 0 off")
    if ac.wall_s <= 0:
        raise ValueError(f"config.agent.wall_s={ac.wall_s} must be > 0")
    if ac.heldout_samples < 0:
        raise ValueError(f"config.agent.heldout_samples={ac.heldout_samples} must be >= 0 (0: off)")


def env_config(config: ml_collections.ConfigDict) -> EnvConfig:
    """The episodes' ``EnvConfig`` from ``config.agent``."""
    ac = config.agent
    return EnvConfig(max_turns=ac.max_turns, limits=Limits(wall_s=ac.wall_s))


def training_tasks(
    config: ml_collections.ConfigDict,
) -> tuple[list[repos.AgentTask], list[repos.AgentTask]]:
    """The SFT tasks (``config.agent.train_tasks``) and the RL tasks (``rl_tasks``).

    Both come from one draw of the training split, SFT's first: RL samples repositories the
    warm-up never saw, so the SFT policy cannot have memorised their fixes and its samples on
    them differ, which is what gives a GRPO group a spread of rewards.
    """
    ac = config.agent
    tasks = repos.suite("train", ac.train_tasks + ac.rl_tasks, seed=config.seed)
    return tasks[: ac.train_tasks], tasks[ac.train_tasks :]


def stop_text(tokenizer: Tokenizer) -> str:
    """The text of the stop token that ends a model turn (``rollout.stop_token``).

    Raises:
      ValueError: the token's text does not encode back to that one token.
    """
    stop = stop_token(tokenizer)
    # An HF tokenizer's decode drops special tokens; the EOS text is its vocabulary entry.
    bytes_ = isinstance(tokenizer, ByteTokenizer)
    text = tokenizer.decode([stop]) if bytes_ else tokenizer.tok.id_to_token(stop)
    if [int(i) for i in tokenizer.encode(text)] != [stop]:
        raise ValueError(f"the stop token {stop} ({text!r}) does not encode back to itself")
    return text


def sft_examples(config: ml_collections.ConfigDict, tokenizer: Tokenizer) -> list[dict[str, str]]:
    """SFT rows ``{"prompt", "response", "domain"}``: every model turn of the scripted
    successful episode of each training task, its prompt the context before it; then, for the
    first ``config.agent.recovery_share`` of the tasks, the turns of a recovery episode after
    its slip (``trajectories.slip``). The slip stays in the context but is never a response.

    A model turn in the context is followed by the stop token (``stop_text``: ``"\\n"`` for
    bytes, the EOS of a BPE tokenizer), as a rollout leaves it; the row's response gets it from
    ``SFTDataset``.
    """
    cfg = env_config(config)
    stop = stop_text(tokenizer)
    tasks = training_tasks(config)[0]
    episodes = [(trajectories.scripted_episode(t, cfg), None) for t in tasks]
    for i, t in enumerate(tasks[: round(config.agent.recovery_share * len(tasks))]):
        mistake = trajectories.slip(t, seed=config.seed * 100_003 + i)
        episodes.append((trajectories.scripted_episode(t, cfg, mistake), mistake))
    rows = []
    for segments, mistake in episodes:
        context, turn = "", 0
        for role, text in segments:
            if role == "model":
                # A recovery episode's cat is the clean episode's row; its slip is not taught.
                if mistake is None or turn >= 2:
                    rows.append({"prompt": context, "response": text, "domain": DOMAIN})
                text += stop
                turn += 1
            context += text
    return rows


@dataclasses.dataclass(frozen=True)
class Sampled:
    """One RL step's episodes as a training batch (``rl_step``'s layout, rows = segments).

    Attributes:
      batch: ``tokens``, ``mask``, ``advantages``, ``rollout_logp`` (and ``routing``) [R, ...]
        with R = episodes x ``max_segments``; unused rows are all padding (mask 0).
      rewards: float32 [E] each episode's reward, E = prompts x group size.
      stats: rollout statistics (model tokens per episode, turns, cut share, segments).
    """

    batch: dict
    rewards: np.ndarray
    stats: dict[str, float]


def to_batch(episodes: list[Episode], advantages: np.ndarray, max_segments: int) -> dict:
    """The training batch of ``episodes``: each segment a row, with its episode's advantage."""
    first = episodes[0].segments[0]
    size = first.tokens.shape[0]
    rows = len(episodes) * max_segments
    tokens = np.zeros((rows, size), np.int32)
    mask = np.zeros((rows, size), np.float32)
    logp = np.zeros((rows, size), np.float32)
    adv = np.zeros((rows,), np.float32)
    routing = None
    if first.routing is not None:
        routing = np.full((rows, first.routing.shape[0], size, first.routing.shape[-1]), -1,
                          np.int32)  # fmt: skip
    for e, (episode, a) in enumerate(zip(episodes, advantages, strict=True)):
        if len(episode.segments) > max_segments:
            raise ValueError(f"an episode has {len(episode.segments)} segments, more than "
                             f"config.agent.max_segments={max_segments}")  # fmt: skip
        for j, seg in enumerate(episode.segments):
            r = e * max_segments + j
            tokens[r], mask[r], logp[r], adv[r] = seg.tokens, seg.mask, seg.logprobs, a
            if routing is not None:
                routing[r] = seg.routing
    batch = {"tokens": tokens, "mask": mask[:, 1:], "advantages": adv, "rollout_logp": logp[:, 1:]}
    if routing is not None:
        batch["routing"] = np.ascontiguousarray(routing[:, :, :-1])  # [R, L, S - 1, k]
    return batch


class AgentSource:
    """The agent task suite as the RL loop's source of batches and held-out scores.

    Args:
      config: the run's config (``agent``, ``rl``, ``seed``).
      tokenizer: the run's tokenizer.
    """

    def __init__(self, config: ml_collections.ConfigDict, tokenizer: Tokenizer):
        check_config(config)
        self.config, self.tokenizer = config, tokenizer
        self.env_cfg = env_config(config)
        self.heldout_tasks = repos.suite("heldout", config.agent.heldout_tasks, seed=config.seed)

    @functools.cached_property
    def train(self) -> list[repos.AgentTask]:
        """The RL tasks (``training_tasks``), rendered on first use (held-out needs none)."""
        return training_tasks(self.config)[1]

    def _episodes(self, model, tasks_, *, temperature: float, seed: int, record: bool):
        ac = self.config.agent
        envs = [AgentEnv(t, self.env_cfg) for t in tasks_]
        try:
            return run_episodes(
                model, self.tokenizer, envs, max_context=ac.max_context,
                max_turn_tokens=ac.max_turn_tokens, temperature=temperature, seed=seed,
                top_k=self.config.rl.top_k, chunk=ac.chunk, compact_fraction=ac.compact_fraction,
                max_segments=ac.max_segments, workers=ac.workers, record=record,
            )  # fmt: skip
        finally:
            for env in envs:
                env.close()

    def sample(self, model: MiMoV2Flash, prompt_seed: int, sample_seed: int) -> Sampled:
        """G episodes of each of P training tasks (drawn with ``prompt_seed``), as a batch.

        Args:
          model: the rollout model.
          prompt_seed: picks the P tasks.
          sample_seed: the sampling seed.
        """
        rc = self.config.rl
        rng = np.random.default_rng(prompt_seed)
        picked = rng.choice(len(self.train), rc.prompts_per_step, replace=False)
        tasks_ = [self.train[i] for i in picked for _ in range(rc.group_size)]
        episodes = self._episodes(model, tasks_, temperature=rc.temperature, seed=sample_seed,
                                  record=True)  # fmt: skip
        rewards = np.array([e.reward for e in episodes], np.float32)
        adv = np.asarray(
            losses.group_advantages(
                jnp.asarray(rewards), group_size=rc.group_size, normalize_std=rc.advantage == "grpo"
            )  # fmt: skip
        )
        batch = to_batch(episodes, adv, self.config.agent.max_segments)
        return Sampled(batch, rewards, _stats(episodes))

    def heldout_episodes(self, model: MiMoV2Flash) -> tuple[list[Episode], list[Episode]]:
        """The held-out episodes: one greedy per task, and ``agent.heldout_samples`` k sampled
        per task as RL samples them (``rl.temperature``, ``rl.top_k``; the same seed at every
        evaluation), task-major (task i's are ``[i * k, (i + 1) * k)``; none when k = 0)."""
        greedy = self._episodes(model, self.heldout_tasks, temperature=0.0, seed=0,
                                record=False)  # fmt: skip
        k = self.config.agent.heldout_samples
        sampled = []
        if k:
            tasks_ = [t for t in self.heldout_tasks for _ in range(k)]
            sampled = self._episodes(model, tasks_, temperature=self.config.rl.temperature,
                                     seed=_HELDOUT_SEED, record=False)  # fmt: skip
        return greedy, sampled

    def heldout(self, model: MiMoV2Flash) -> dict[str, float]:
        """Solve rates (and greedy episode statistics) on the held-out tasks.

        Returns:
          ``heldout_success``: the greedy solve rate; with ``agent.heldout_samples`` > 0 also
          ``heldout_sampled_success``: the solve rate of the sampled episodes, the rate RL
          optimises.
        """
        greedy, sampled = self.heldout_episodes(model)
        out = {"heldout_success": float(np.mean([e.reward == 1.0 for e in greedy])),
               **{f"heldout_{k}": v for k, v in _stats(greedy).items()}}  # fmt: skip
        if sampled:
            out["heldout_sampled_success"] = float(np.mean([e.reward == 1.0 for e in sampled]))
        return out


def _stats(episodes: list[Episode]) -> dict[str, float]:
    return {
        "turns": float(np.mean([e.turns for e in episodes])),
        "model_tokens": float(np.mean([sum(s.mask.sum() for s in e.segments) for e in episodes])),
        "cut_share": float(np.mean(["cut" in e.info for e in episodes])),
        "format_error_share": float(
            np.mean(
                [
                    any("format_error" in str(t) for r, t in e.transcript if r == "tool")
                    for e in episodes
                ]
            )  # fmt: skip
        ),
        "segments": float(np.mean([len(e.segments) for e in episodes])),
    }


def example_episode(
    config: ml_collections.ConfigDict, model: MiMoV2Flash, tokenizer: Tokenizer, index: int = 0
) -> Episode:
    """The policy's greedy episode on held-out task ``index`` (``--mode=episode``)."""
    source = AgentSource(config, tokenizer)
    n = len(source.heldout_tasks)
    if not 0 <= index < n:
        raise ValueError(f"--task_index={index}: in 0..{n - 1} (config.agent.heldout_tasks={n})")
    task = source.heldout_tasks[index]
    (episode,) = source._episodes(model, [task], temperature=0.0, seed=0, record=False)
    episode.info["task"] = task.name
    return episode


def format_episode(episode: Episode) -> str:
    """An episode as text: each turn under its role, then the reward and how it ended."""
    parts = [f"--- {role} ---\n{text.rstrip()}" for role, text in episode.transcript]
    info = ", ".join(f"{k}={v}" for k, v in sorted(episode.info.items()))
    parts.append(f"--- reward {episode.reward} after {episode.turns} model turns ({info})")
    return "\n".join(parts)
