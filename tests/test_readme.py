"""Every shell command in the README is exercised: by a named test, by CI, or run here.

The commands are the README's fenced ``bash``/``sh`` blocks (split at ``&&``, comments dropped)
plus inline code spans that start a command (``python ...``, ``pip ...``). ``COVERAGE`` maps
each one, in canonical ``shlex.join`` form, to how it is exercised:

* ``ByTests(...)``: pytest node ids (``file::function``) that run the same mode or script; they
  are checked to exist (by parsing the test files, without importing them).
* ``ByCI()``: the command is one of the lines of ``.ci/run``, which CI executes from a clean clone.
* ``Run(...)``: the command is run here as written plus small-size flags (bench smoke tests).

A README command missing from the table fails ``test_every_readme_command_is_covered``; so does a
table entry whose command left the README. Nothing here asserts speed.
"""

import ast
import dataclasses
import os
import re
import shlex
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
PROGRAMS = ("python", "pip", "bash", "sh")


@dataclasses.dataclass(frozen=True)
class ByTests:
    """Exercised by these pytest node ids (``test_file.py::test_function``)."""

    node_ids: tuple[str, ...]

    def __init__(self, *node_ids: str):
        object.__setattr__(self, "node_ids", node_ids)


@dataclasses.dataclass(frozen=True)
class ByCI:
    """Exercised by ``.ci/run``, which runs this exact command."""


@dataclasses.dataclass(frozen=True)
class Run:
    """Run here: the README command, with ``replace`` substitutions, plus ``extra`` flags.

    ``{tmp}`` in a flag is a temporary directory; ``{workdir}`` a workdir holding a random
    ``configs/debug.py`` model. ``expect`` must appear in stdout.
    """

    extra: tuple[str, ...]
    expect: str
    replace: tuple[tuple[str, str], ...] = ()


_CLI = "test_cli.py::test_train_eval_generate_commands"
COVERAGE = {
    "pip install -r requirements-dev.txt": ByCI(),
    "python -m pytest -n 2 tests": ByCI(),
    "python main.py --config=configs/tiny.py --workdir=runs/tiny": ByTests(
        _CLI,
        "test_cli.py::test_shipped_configs_build",
        "test_train.py::test_debug_run_learns_and_resumes_exactly",
    ),
    "python main.py --mode=eval --config=configs/tiny.py --workdir=runs/tiny": ByTests(_CLI),
    (
        "python main.py --mode=eval --config=configs/tiny.py --workdir=runs/tiny "
        "--config.train.eval_batches=0"
    ): ByTests(_CLI, "test_train.py::test_evaluate_spread_windows_and_whole_split"),
    (
        "python main.py --mode=generate --workdir=runs/tiny '--prompt=def ' --num_draft_tokens=3"
    ): ByTests(_CLI),
    "python main.py --mode=import_hf --hf_dir=HF_DIR --workdir=runs/imported": ByTests(
        "test_cli.py::test_import_export_round_trip"
    ),
    "python main.py --mode=export_hf --workdir=runs/imported --hf_dir=OUT_DIR": ByTests(
        "test_cli.py::test_import_export_round_trip"
    ),
    (
        "python main.py --mode=generate --hf_dir=HF_DIR --config.mesh.shape=1,2,2,2 "
        "--config.mesh.rules=decode --chat --prompt=Hello"
    ): ByTests("test_cli_mesh.py::test_generate_from_hf_dir_on_mesh_equals_one_device"),
    (
        "python main.py --mode=import_hf --hf_dir=HF_DIR --workdir=runs/imported "
        "--config.mesh.shape=1,2,2,2 --config.mesh.rules=decode"
    ): ByTests("test_cli_mesh.py::test_import_hf_on_mesh_then_generate_from_workdir"),
    "python main.py --mode=generate --workdir=runs/imported --chat --prompt=Hello": ByTests(
        "test_cli.py::test_import_export_round_trip",
        "test_chat.py::test_render_and_ids_equal_transformers",
    ),
    "python main.py --mode=sft --config=configs/rl_tiny.py --workdir=runs/sft_tiny": ByTests(
        "test_sft.py::test_sft_command", "test_rl.py::test_cli_rl_runs_and_names_bad_fields"
    ),
    "python main.py --mode=rl --config=configs/agent_tiny.py --workdir=runs/agent_tiny": ByTests(
        "test_agent_rl.py::test_agent_rl_run_end_to_end"
    ),
    (
        "python main.py --mode=episode --config=configs/agent_tiny.py --workdir=runs/agent_tiny "
        "--task_index=0"
    ): ByTests("test_agent_rl.py::test_agent_rl_run_end_to_end"),
    "python main.py --mode=rl --config=configs/rl_tiny.py --workdir=runs/rl_tiny": ByTests(
        "test_rl.py::test_cli_rl_runs_and_names_bad_fields",
        "test_rl.py::test_resume_follows_the_uninterrupted_run",
    ),
    "python bench/agent_heldout.py --before=runs/agent_tiny/sft --after=runs/agent_tiny": ByTests(
        "test_bench_agent_heldout.py::test_agent_heldout_script_end_to_end"
    ),
    "python bench/rl_routing.py --workdir=runs/rl_routing": ByTests(
        "test_bench_rl_routing.py::test_rl_routing_smoke"
    ),
    **{
        f"python main.py --mode=rl --config=configs/mopd_tiny.py:teacher_{d} "
        f"--workdir=runs/teacher_{d}": ByTests(
            "test_bench_mopd_table.py::test_mopd_table_smoke",
            "test_rl.py::test_cli_rl_runs_and_names_bad_fields",
        )
        for d in ("reversal", "addition")
    },
    "python main.py --mode=sft --config=configs/mopd_tiny.py --workdir=runs/mopd_student": ByTests(
        "test_bench_mopd_table.py::test_mopd_table_smoke",
        "test_mixture.py::test_sft_on_two_domains_logs_heldout_success_per_domain",
        "test_sft.py::test_sft_command",
    ),
    (
        "python main.py --mode=mopd --config=configs/mopd_tiny.py "
        "--config.init_from=runs/mopd_student --workdir=runs/mopd"
    ): ByTests(
        "test_bench_mopd_table.py::test_mopd_table_smoke",
        "test_mopd.py::test_mopd_resume_follows_the_uninterrupted_run",
    ),
    "python bench/mopd_table.py --workdir=runs": ByTests(
        "test_bench_mopd_table.py::test_mopd_table_smoke"
    ),
    "python bench/attention.py": Run(
        ("--quick", "--seqs=128,256", "--repeats=1", "--out={tmp}/attention.json"), "ratios are T="
    ),
    "python bench/forward_vs_torch.py": Run(
        ("--quick", "--out={tmp}/forward.json"), "max |logits diff|"
    ),
    "python bench/decode.py --workdir=runs/tiny": Run(
        (
            "--batch=1",
            "--prompt-len=8",
            "--new=4",
            "--drafts=1",
            "--runs=1",
            "--no-torch",
            "--out={tmp}/decode.json",
        ),  # fmt: skip
        "ours, MTP speculative, 1 draft",
        replace=(("--workdir=runs/tiny", "--workdir={workdir}"),),
    ),
    "python bench/convert.py": Run(
        ("--quick", "--repeats=1", "--out={tmp}/convert.json"), "single"
    ),
    "python bench/memory_plan.py": Run(
        (
            "--quick",
            "--presets=fsdp_ep",
            "--token_chunk=16",
            "--loss_chunk=16",
            "--out={tmp}/memory_plan.json",
        ),
        "per device",
    ),
    "python main.py --config=configs/mimo_v2_flash.py --workdir=gs://BUCKET/mimo --distributed": (
        ByTests(
            "test_sharding.py::test_two_process_training_equals_one_process",
            "test_cli.py::test_shipped_configs_build",
        )
    ),
    "python bench/train_vs_torch.py": Run(
        (
            "--batch=1",
            "--seq=16",
            "--warmup=0",
            "--steps=1",
            "--peak-size=64",
            "--peak-runs=1",
            "--out={tmp}/train.json",
        ),  # fmt: skip
        "speedup",
    ),
}


# ---------------------------------------------------------------------------------------------
# Extraction.


def _split_commands(line: str) -> list[str]:
    """Canonical commands of one shell line: comments dropped, split at ``&&`` / ``;``."""
    tokens = shlex.split(line, comments=True)
    out, cur = [], []
    for tok in [*tokens, "&&"]:
        if tok in ("&&", ";", "||"):
            if cur:
                out.append(shlex.join(cur))
            cur = []
        else:
            cur.append(tok)
    return out


def readme_commands(text: str) -> list[str]:
    """Every shell command in ``text`` (markdown), canonical and de-duplicated, in order.

    Args:
      text: README contents.

    Returns:
      ``shlex.join`` forms of the commands of fenced bash/sh/shell/console blocks (and of
      language-less blocks' lines that start with a known program), then of inline code spans
      outside fences that start with one.
    """
    fence = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.S | re.M)
    cmds = []
    for lang, body in fence.findall(text):
        if lang not in ("bash", "sh", "shell", "console", ""):
            continue
        for line in body.splitlines():
            line = line.strip().removeprefix("$ ")
            if line and (lang or line.split()[0] in PROGRAMS):
                cmds += _split_commands(line)
    for span in re.findall(r"`([^`\n]+)`", fence.sub("", text)):
        if span.split()[0] in PROGRAMS:
            cmds += _split_commands(span)
    return list(dict.fromkeys(cmds))


def _test_functions(path: str) -> set[str]:
    """``name`` and ``Class::name`` of the test functions defined in a test file."""
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    names = set()
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            names.add(node.name)
        elif isinstance(node, ast.ClassDef):
            names |= {
                f"{node.name}::{m.name}"
                for m in node.body
                if isinstance(m, ast.FunctionDef | ast.AsyncFunctionDef)
            }
    return names


def test_extraction():
    text = """
```bash
pip install -r r.txt && python main.py --a=1   # train
python main.py --prompt='def '
```
```python
import os  # not a command
```
Run `python bench/x.py --quick` or read `README.md`.
"""
    assert readme_commands(text) == [
        "pip install -r r.txt",
        "python main.py --a=1",
        "python main.py '--prompt=def '",
        "python bench/x.py --quick",
    ]


# ---------------------------------------------------------------------------------------------
# The README against the table.


def _readme() -> str:
    with open(README) as f:
        return f.read()


def test_every_readme_command_is_covered():
    cmds = readme_commands(_readme())
    missing = [c for c in cmds if c not in COVERAGE]
    assert not missing, (
        f"README commands with no test: {missing}. Add each to COVERAGE in tests/test_readme.py "
        "with the tests that exercise it (or a Run entry that runs it)."
    )
    stale = [c for c in COVERAGE if c not in cmds]
    assert not stale, f"COVERAGE lists commands no longer in the README: {stale}"


def test_mapped_tests_exist():
    for cmd, how in COVERAGE.items():
        if not isinstance(how, ByTests):
            continue
        assert how.node_ids, cmd
        for node in how.node_ids:
            file, func = node.split("::", 1)
            path = os.path.join(ROOT, "tests", file)
            assert os.path.isfile(path), f"{cmd!r} -> {node}: no {path}"
            assert func.split("[")[0] in _test_functions(path), f"{cmd!r} -> {node}: not found"


def _core(tokens: list[str]) -> list[str]:
    """A command without what does not change what it runs: ``python -m pip`` is ``pip``."""
    if tokens[:3] == ["python", "-m", "pip"]:
        tokens = ["pip", *tokens[3:]]
    return [t for t in tokens if t not in ("--quiet", "-q")]


def test_ci_runs_its_commands():
    with open(os.path.join(ROOT, ".ci", "run")) as f:
        ci = [_core(shlex.split(line, comments=True)) for line in f]
    for cmd, how in COVERAGE.items():
        if isinstance(how, ByCI):
            assert _core(shlex.split(cmd)) in ci, f"{cmd!r} is not run by .ci/run"


# ---------------------------------------------------------------------------------------------
# Commands run here.


@pytest.fixture(scope="module")
def debug_workdir(tmp_path_factory) -> str:
    """A workdir holding a random ``configs/debug.py`` model at step 1 (as a run would leave)."""
    from flax import nnx  # noqa: PLC0415  (only this fixture needs the library)

    import mimo_jax  # noqa: PLC0415
    from configs.debug import get_config  # noqa: PLC0415
    from mimo_jax import checkpoint, train  # noqa: PLC0415

    wd = str(tmp_path_factory.mktemp("debug_run"))
    cfg = train.model_config(get_config())
    model = mimo_jax.MiMoV2Flash(cfg, rngs=nnx.Rngs(0))
    checkpoint.save_model_config(wd, cfg)
    ckpt = checkpoint.Checkpointer(wd)
    ckpt.save(1, model)
    ckpt.close()
    return wd


@pytest.mark.parametrize("cmd", [c for c, how in COVERAGE.items() if isinstance(how, Run)])
def test_run_command(cmd, tmp_path, request):
    how = COVERAGE[cmd]
    fill = {"tmp": str(tmp_path)}
    if any("{workdir}" in new for _, new in how.replace):
        fill["workdir"] = request.getfixturevalue("debug_workdir")
    for old, new in how.replace:
        cmd = cmd.replace(old, new.format(**fill))
    argv = shlex.split(cmd) + [x.format(**fill) for x in how.extra]
    assert argv[0] == "python", argv
    # A smoke test: numbers are not checked, so skip most XLA optimisations (halves compile time).
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": ROOT,
        "JAX_DISABLE_MOST_OPTIMIZATIONS": "1",
    }
    r = subprocess.run(
        [sys.executable, *argv[1:]], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert r.returncode == 0, f"{shlex.join(argv)} failed:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    assert how.expect in r.stdout, r.stdout[-2000:]
