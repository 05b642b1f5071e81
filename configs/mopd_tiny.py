"""Multi-teacher on-policy distillation on CPU: a student learns two tasks from two teachers.

The report's recipe, in the order the README's post-training section runs it:

* ``configs/mopd_tiny.py`` (default), ``--mode=sft``: the student, SFT on both tasks' examples;
* ``configs/mopd_tiny.py:teacher_reversal`` / ``:teacher_addition``, ``--mode=rl``: one domain
  specialist per task, the student RL'd (GRPO) on that task alone: the domain teachers;
* ``configs/mopd_tiny.py``, ``--mode=mopd``: the student distils both teachers; ``--mode=rl``
  is the outcome-reward baseline on the same mixture.

The teachers start from ``runs/mopd_student``; MOPD finds them at ``config.mopd.teachers`` and
the student at ``config.init_from``.
"""

import ml_collections

from configs import rl_tiny

TASKS = {
    "reversal": ("digit_reversal", {"min_digits": 3, "max_digits": 5}),
    "addition": ("addition", {"max_operand": 99}),
}


def get_config(arg: str = "student"):
    c = rl_tiny.get_config()
    if arg.startswith("teacher_"):
        name, options = TASKS[arg.removeprefix("teacher_")]
        c.task.name = name
        c.task.options = ml_collections.ConfigDict(options)
        # A specialist from the student itself (the report's recipe): it shares the student's
        # distribution everywhere but on its own domain, where RL moved it.
        c.init_from = "runs/mopd_student"
        c.rl.steps = 400
        if name == "addition":  # its SFT split holds ~2130 problems (a warm-up without init_from)
            c.sft.num_examples = 2048
        return c
    if arg != "student":
        raise ValueError(f"configs/mopd_tiny.py:{arg}: expected student, teacher_reversal or "
                         "teacher_addition")  # fmt: skip
    # SFT on both tasks' examples (half a batch each): 130 steps leave reversal at 0%; 260
    # leave the student at ~15% reversal, ~2% addition, below both teachers.
    c.train.steps = 260
    c.domains = ml_collections.ConfigDict(
        {
            d: {"task": name, "options": ml_collections.ConfigDict(options), "weight": 1.0}
            for d, (name, options) in TASKS.items()
        }
    )
    # MOPD (--mode=mopd) reuses config.rl's loop, sampling and optimizer fields.
    c.mopd = ml_collections.ConfigDict()
    c.mopd.teachers = ml_collections.ConfigDict(
        {"reversal": "runs/teacher_reversal", "addition": "runs/teacher_addition"}
    )
    c.mopd.alpha = 1.0  # weight of the outcome advantage beside the teacher's token reward
    c.mopd.eps_low = 0.5  # tokens whose pi_train / pi_rollout leaves [eps_low, eps_high] are
    c.mopd.eps_high = 2.0  # dropped (the report's eq. 8)
    c.mopd.teacher_dtype = "bfloat16"  # teachers score at the rollout precision
    # Subtract the batch's mean teacher reward from each token's (losses.mopd_loss).
    c.mopd.baseline = False
    return c
