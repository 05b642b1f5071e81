"""Multi-teacher on-policy distillation (MOPD): the RL loop with each domain's teacher scoring
the student's own samples.

``run(config, workdir)`` is ``main.py --mode=mopd``. It is ``rl.run`` (same rollouts, routing
replay, outcome rewards, checkpoints and resume) with the objective of ``losses.mopd_loss``:
every sampled token's advantage is the reverse-KL reward ``log pi_teacher - log pi_student`` of
the teacher of its prompt's domain, plus ``alpha`` times the group-normalised outcome advantage.

``config.mopd.teachers`` maps each domain of the run's mixture (``config.domains``, or the one
``config.task``) to a mimo-jax workdir, an HF checkpoint directory, or ``"self"`` (the student's
own starting point). Teachers may differ from the student in size and depth but must share its
tokenizer and vocabulary; they run without gradients at ``config.mopd.teacher_dtype``, one
batched forward per domain over that domain's rows.
"""

import functools
import os

import jax
import ml_collections
import numpy as np
from flax import nnx

from mimo_jax import checkpoint, data, hf
from mimo_jax.model import MiMoV2Flash
from mimo_jax.post_training import policy, rl, rl_step, rollout, tasks
from mimo_jax.sampling import Sampling

SELF = "self"


def check_config(config: ml_collections.ConfigDict, mixture: tasks.Mixture) -> None:
    """Raises ValueError naming the first bad ``config.mopd`` field."""
    mc = config.mopd
    if not 0 < mc.eps_low <= 1 <= mc.eps_high:
        raise ValueError(
            f"config.mopd.eps_low={mc.eps_low}, eps_high={mc.eps_high}: need "
            "0 < eps_low <= 1 <= eps_high"
        )
    if mc.alpha < 0:
        raise ValueError(f"config.mopd.alpha={mc.alpha}: must be >= 0")
    if mc.teacher_dtype not in rollout.ROLLOUT_DTYPES:
        raise ValueError(
            f"config.mopd.teacher_dtype={mc.teacher_dtype!r}: one of {rollout.ROLLOUT_DTYPES}"
        )
    teachers = dict(mc.teachers)
    for domain in mixture.domains:
        if not teachers.get(domain):
            raise ValueError(
                f"config.mopd.teachers has no teacher for domain {domain!r} (teachers for "
                f"{sorted(teachers)}; domains {list(mixture.domains)})"
            )
    extra = sorted(set(teachers) - set(mixture.domains))
    if extra:
        raise ValueError(
            f"config.mopd.teachers names domains {extra} that the run's mixture does not have "
            f"({list(mixture.domains)})"
        )


def _tokenizer_path(source: str) -> str | None:
    """The tokenizer a teacher directory carries (``tokenizer.json``), None for bytes."""
    path = os.path.join(source, "tokenizer.json")
    return path if os.path.isfile(path) else None


def _same_tokenizer(a: data.Tokenizer, b: data.Tokenizer) -> bool:
    probe = "def f(x):\n    return x + 1  # é 中文 17+25= rev 4827="
    return a.vocab_size == b.vocab_size and np.array_equal(a.encode(probe), b.encode(probe))


def load_teacher(source: str, student: data.Tokenizer, domain: str) -> MiMoV2Flash:
    """A teacher model from a workdir or HF directory, with its own architecture.

    Raises:
      ValueError: naming the domain: an unreadable source or a tokenizer other than the
        student's.
    """
    where = f"config.mopd.teachers.{domain}={source!r}"
    if os.path.isfile(os.path.join(source, checkpoint.CONFIG_FILE)):
        model = policy.restore_workdir(source, checkpoint.load_model_config(source), where=where)
    elif os.path.isfile(os.path.join(source, "config.json")):
        model = hf.load_hf(source)
    else:
        raise ValueError(f"{where}: not a mimo-jax workdir nor an HF checkpoint directory")
    own = data.load_tokenizer(_tokenizer_path(source))
    if not _same_tokenizer(own, student):
        raise ValueError(
            f"{where}: the teacher's tokenizer ({type(own).__name__}, vocab {own.vocab_size}) "
            f"is not the student's ({type(student).__name__}, vocab {student.vocab_size})"
        )
    return model


@functools.partial(jax.jit, static_argnums=(0, 3))
def _teacher_logp(graphdef, state, tokens, sampling: Sampling):
    model = nnx.merge(graphdef, state)
    return rl_step.policy_forward(model, {"tokens": tokens}, sampling, replay=False)[0]


class Teachers:
    """The domain teachers of a MOPD run and their scores of the student's samples."""

    def __init__(
        self,
        config: ml_collections.ConfigDict,
        mixture: tasks.Mixture,
        tokenizer: data.Tokenizer,
        init_from: str,
    ):
        """Loads every domain's teacher (each distinct source once) at ``teacher_dtype``.

        Args:
          config: the run's config (``mopd`` and ``rl`` sections).
          mixture: the run's domains.
          tokenizer: the student's tokenizer.
          init_from: the student's starting point (the ``"self"`` teacher).
        """
        mc = config.mopd
        check_config(config, mixture)
        self.sampling = Sampling(float(config.rl.temperature), int(config.rl.top_k), 1.0)
        loaded: dict[str, MiMoV2Flash] = {}
        self.models: dict[str, MiMoV2Flash] = {}
        for domain in mixture.domains:
            source = init_from if mc.teachers[domain] == SELF else mc.teachers[domain]
            if source not in loaded:
                model = load_teacher(source, tokenizer, domain)
                loaded[source] = rollout.rollout_model(model, mc.teacher_dtype)
            self.models[domain] = loaded[source]
        # Split once: the teachers are frozen, and splitting a model costs on every call.
        self._split = {d: nnx.split(m) for d, m in self.models.items()}

    def logp(self, batch: dict, domains: list[str]) -> np.ndarray:
        """float32 [B, S - 1]: each row's labels scored by the teacher of the row's domain.

        Args:
          batch: a host rollout batch (``rl_step.build_batch``), rows grouped by domain.
          domains: the domain of each row.
        """
        tokens = np.asarray(batch["tokens"])
        out = np.zeros((tokens.shape[0], tokens.shape[1] - 1), np.float32)
        rows = np.array(domains)
        for domain, (graphdef, state) in self._split.items():
            (idx,) = np.nonzero(rows == domain)
            if idx.size:
                logp = _teacher_logp(graphdef, state, tokens[idx], self.sampling)
                out[idx] = np.asarray(logp)
        return out

    @staticmethod
    def reverse_kl(batch: dict) -> np.ndarray:
        """float [B]: per row, the mean over its response tokens of log mu - log pi_teacher
        (the rollout engine's log-probs: a k1 estimate of KL(student || teacher))."""
        mask = np.asarray(batch["mask"])
        diff = (np.asarray(batch["rollout_logp"]) - batch["teacher_logp"]) * mask
        return diff.sum(axis=1) / np.maximum(mask.sum(axis=1), 1)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """MOPD from ``config.init_from`` (or the SFT warm-up), resuming from ``workdir``.

    Args:
      config: an RL config (``configs/mopd_tiny.py``) with a ``mopd`` section.
      workdir: run directory (see ``rl.run``).

    Returns:
      The last logged metrics.
    """
    if "mopd" not in config:
        raise ValueError("--mode=mopd needs a config with a `mopd` section (configs/mopd_tiny.py)")
    check_config(config, policy.mixture_from_config(config))  # before any warm-up or loading

    def teachers_from(mixture, tokenizer, init_from):
        return Teachers(config, mixture, tokenizer, init_from)

    return rl.run(config, workdir, teachers_from=teachers_from)
