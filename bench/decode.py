"""Decoding throughput: plain vs MTP speculative greedy decoding, where a step's time goes, and
ours vs transformers.

Loads the model trained by the tiny default run (``python main.py --config=configs/tiny.py
--workdir=runs/tiny``), takes prompts from held-out stdlib code (the first validation windows
of the default byte-level stdlib data), and decodes them greedily:

* plain (``num_draft_tokens=0``) and speculative with 1, 2 and 3 MTP drafts, side by side:
  tokens/s of whole ``generate`` calls (each configuration warmed up once, so compilation is
  excluded; the configurations' runs interleaved, so a busy machine slows them alike; medians),
  mean accepted length (tokens committed per verify step) and per-depth acceptance (share of
  verify steps in which draft k was accepted). Speculative greedy must reproduce the plain tokens
  exactly, which the script checks;
* where the time goes, per configuration: the prefill and the host's share of a call, and one
  loop step split into draft, verify and the rest (accept and loop bookkeeping), in units of a
  plain step. The loop is timed from a prefilled state; draft and verify are each jitted alone
  and repeated on one state (``mimo_jax.generate`` exposes the phases);
* transformers' ``MiMoV2FlashForCausalLM.generate`` (greedy, eager attention, ``use_cache``) on
  the same weights, exported with ``mimo_jax.hf.save_hf`` (transformers has no MTP, so it is
  compared with our plain decoding at the same batch, prompts and new tokens), and whether its
  greedy tokens agree with ours.

    python bench/decode.py --workdir=runs/tiny [--batch 1 --prompt-len 128 --new 64]
    python bench/decode.py --random      # random tiny model: a smoke test, acceptance ~0

Writes bench/results/decode.json.
"""

import argparse
import os
import sys
import tempfile
import time

import common
import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

import mimo_jax
from mimo_jax import checkpoint, data, train
from mimo_jax.generate import decode_loop, draft, generate, prefill, verify
from mimo_jax.sampling import Sampling


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--workdir", default="runs/tiny", help="a trained mimo-jax workdir")
    p.add_argument("--random", action="store_true", help="random tiny model (no workdir needed)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new", type=int, default=64, help="new tokens per row")
    p.add_argument("--drafts", default="1,2,3", help="speculative draft counts to run")
    p.add_argument("--runs", type=int, default=9, help="timed runs per configuration (median)")
    p.add_argument("--reps", type=int, default=32, help="repetitions of a phase per timed run")
    p.add_argument("--no-torch", action="store_true", help="skip the transformers comparison")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch intra-op threads")
    p.add_argument("--out", default=os.path.join(common.RESULTS, "decode.json"))
    return p.parse_args()


def load(a: argparse.Namespace) -> tuple[mimo_jax.MiMoV2Flash, str]:
    """The model to benchmark and a description of where it came from."""
    if a.random:
        from configs.tiny import get_config  # noqa: PLC0415  (configs is not a package dep)

        cfg = train.model_config(get_config())  # resolves dtype="auto" like a training run
        return mimo_jax.MiMoV2Flash(cfg, rngs=nnx.Rngs(0)), "random (configs/tiny.py)"
    if not os.path.isdir(a.workdir):
        sys.exit(
            f"workdir {a.workdir!r} does not exist: train it first (python main.py "
            f"--config=configs/tiny.py --workdir={a.workdir}) or pass --random"
        )
    model = checkpoint.load_model(a.workdir)
    step = checkpoint.Checkpointer(a.workdir)
    try:
        latest = step.latest_step()
    finally:
        step.close()
    return model, f"{a.workdir} step {latest}"


def prompts(a: argparse.Namespace, vocab: int) -> np.ndarray:
    """[B, prompt_len] held-out stdlib code: the first validation windows, one per row."""
    splits = data.load_tokens(data.DataSpec())  # the default: byte-level stdlib, 2% held out
    windows = next(data.eval_batches(splits.validation, batch_size=a.batch, seq_len=a.prompt_len))
    ids = windows[:, : a.prompt_len]
    if ids.max() >= vocab:
        sys.exit(f"prompt token {ids.max()} >= model vocab {vocab}")
    return ids


def phase_fns(model, ids, a, d) -> tuple[dict, int]:
    """Callables timing the phases of ``generate`` with d drafts, and the loop's step count.

    ``prefill`` and ``loop`` are what one call runs (the loop from the prefilled state);
    ``draft`` and ``verify`` repeat one phase ``a.reps`` times on one state inside one jit, and
    ``call`` is such a jitted call without the phase (subtracted from both).
    """
    greedy = Sampling()
    lengths = jnp.full((ids.shape[0],), ids.shape[1], jnp.int32)
    ids = jnp.asarray(ids, jnp.int32)

    @jax.jit
    def pre(model):
        return prefill(model, ids, lengths, jax.random.key(0), d=d, max_new=a.new,
                       sampling=greedy, pad=0)  # fmt: skip

    @jax.jit
    def loop(model, s):
        return decode_loop(model, s, d=d, sampling=greedy, max_new=a.new, eos=None)

    @jax.jit
    def drafts(model, s):
        return draft(model, s, d, greedy)

    # Each repetition's inputs depend on the previous one's outputs (an offset that is always 0,
    # which the compiler cannot know), so nothing is hoisted out of the loop or left dead.
    @jax.jit
    def repeat_draft(model, s):
        def body(_, c):
            s, acc = c
            s, dr = draft(model, s.replace(base=s.base + (acc < 0)), d, greedy)
            return s, acc + jnp.sum(dr.tokens)

        return jax.lax.fori_loop(0, a.reps, body, (s, jnp.zeros((), jnp.int32)))

    @jax.jit
    def repeat_verify(model, s, dr):
        def body(_, c):
            s, acc = c
            zero = jnp.isnan(acc).astype(jnp.int32)
            s, logits, hidden = verify(
                model, s.replace(base=s.base + zero), dr.replace(tokens=dr.tokens + zero)
            )
            return s, acc + jnp.sum(logits[..., 0]) + jnp.sum(hidden[..., 0])

        return jax.lax.fori_loop(0, a.reps, body, (s, jnp.zeros((), jnp.float32)))

    @jax.jit
    def repeat_nothing(model, s, dr):  # what a call costs around the repetitions
        del model
        return s, jnp.sum(dr.tokens)

    s0 = pre(model)
    s1, dr = drafts(model, s0)
    steps = int(loop(model, s0).steps)
    ready = jax.block_until_ready
    return {
        "prefill": lambda: ready(pre(model)),
        "loop": lambda: ready(loop(model, s0)),
        "draft": lambda: ready(repeat_draft(model, s0)),
        "verify": lambda: ready(repeat_verify(model, s1, dr)),
        "call": lambda: ready(repeat_nothing(model, s1, dr)),
    }, steps


def time_ours(model, ids, a, drafts: list[int]) -> list[dict]:
    """Whole ``generate`` calls and their phases for every draft count, timed interleaved."""
    fns, out = {}, []
    for d in drafts:
        kw = dict(max_new_tokens=a.new, num_draft_tokens=d)
        t0 = time.perf_counter()
        res = generate(model, ids, **kw)
        res.tokens.block_until_ready()
        phases, steps = phase_fns(model, ids, a, d)
        fns[d, "total"] = lambda kw=kw: generate(model, ids, **kw).tokens.block_until_ready()
        fns.update({(d, name): f for name, f in phases.items()})
        out.append({
            "num_draft_tokens": d,
            "compile_plus_first_run_s": time.perf_counter() - t0,
            "mean_accepted_length": float(res.mean_accepted_length),
            "acceptance_per_depth": np.asarray(res.acceptance_rate).tolist(),
            "verify_steps": int(res.num_steps),
            "loop_steps": steps,
            "tokens": np.asarray(res.tokens)[:, ids.shape[1] :],
        })  # fmt: skip
    med = common.interleaved_medians(fns, a.runs)
    for r in out:
        d, steps = r["num_draft_tokens"], r["loop_steps"]
        r["median_s"] = med[d, "total"]
        r["tokens_per_s"] = a.batch * a.new / r["median_s"]
        r["prefill_s"] = med[d, "prefill"]
        r["loop_s"] = med[d, "loop"]
        r["host_s"] = r["median_s"] - r["prefill_s"] - r["loop_s"]  # dispatch, copies, cropping
        r["step_s"] = r["loop_s"] / max(steps, 1)
        call = med[d, "call"]  # dispatch and state copies, not part of a phase
        r["draft_s"] = max(med[d, "draft"] - call, 0.0) / a.reps if d else 0.0
        r["verify_s"] = max(med[d, "verify"] - call, 0.0) / a.reps
        r["rest_s"] = r["step_s"] - r["draft_s"] - r["verify_s"]
    return out


def time_transformers(model, ids, a) -> dict:
    """transformers ``generate`` on our weights (greedy, eager attention, KV cache)."""
    from transformers import MiMoV2FlashForCausalLM  # noqa: PLC0415  (slow import, optional)

    torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "hf")
        mimo_jax.save_hf(model, path)
        tm = MiMoV2FlashForCausalLM.from_pretrained(
            path, attn_implementation="eager", dtype=torch.float32
        ).eval()
    x = torch.from_numpy(np.asarray(ids, np.int64))
    kw = dict(
        attention_mask=torch.ones_like(x),
        max_new_tokens=a.new,
        min_new_tokens=a.new,  # no early stop: same work as ours
        do_sample=False,
        use_cache=True,
        pad_token_id=0,
    )

    def run():
        with torch.no_grad():
            return tm.generate(x, **kw)

    out = run()  # warm-up
    sec, all_s = common.median_seconds(run, 0, max(1, a.runs - 1))
    return {
        "median_s": sec,
        "runs_s": all_s,
        "tokens_per_s": a.batch * a.new / sec,
        "threads": torch.get_num_threads(),
        "version": __import__("transformers").__version__,
        "tokens": out[:, ids.shape[1] :].numpy(),
    }


def agreement(ours: np.ndarray, theirs: np.ndarray) -> dict:
    """Rows identical, and per row the first differing position (None when identical)."""
    first = []
    for r, t in zip(ours, theirs, strict=True):
        diff = np.nonzero(r != t)[0]
        first.append(int(diff[0]) if diff.size else None)
    return {"rows_equal": sum(f is None for f in first), "first_difference": first}


def print_phases(runs: list[dict]) -> None:
    """Where a call's time goes: prefill, loop steps (split by phase, in plain steps), host."""
    unit = runs[0]["step_s"]
    print(
        f"where the time goes (medians; one step in plain steps, 1.00 = {unit * 1e3:.3f} ms; "
        "rest = accept + loop bookkeeping)"
    )
    print(
        f"{'decoder':<34} {'prefill ms':>10} {'steps':>5} {'step':>5} {'draft':>6} "
        f"{'verify':>6} {'rest':>5} {'loop ms':>8} {'host ms':>8}"
    )
    for r in runs:
        d = r["num_draft_tokens"]
        name = "ours, plain" if d == 0 else f"ours, {d} draft{'s' * (d > 1)}"
        print(
            f"{name:<34} {r['prefill_s'] * 1e3:>10.2f} {r['loop_steps']:>5} "
            f"{r['step_s'] / unit:>5.2f} {r['draft_s'] / unit:>6.2f} "
            f"{r['verify_s'] / unit:>6.2f} {r['rest_s'] / unit:>5.2f} "
            f"{r['loop_s'] * 1e3:>8.2f} {r['host_s'] * 1e3:>8.2f}"
        )


def main():
    a = parse_args()
    model, source = load(a)
    cfg = model.cfg
    drafts = [int(x) for x in a.drafts.split(",") if x]
    if max(drafts, default=0) > cfg.num_mtp_layers:
        sys.exit(f"--drafts {a.drafts}: the model has {cfg.num_mtp_layers} MTP layers")
    ids = prompts(a, cfg.vocab_size)

    runs = time_ours(model, ids, a, [0, *drafts])
    plain = runs[0]["tokens"]
    for r in runs:
        r["equals_plain"] = bool(np.array_equal(r.pop("tokens"), plain))
    hf = None
    if not a.no_torch:
        hf = time_transformers(model, ids, a)
        hf["agreement_with_ours"] = agreement(plain, hf.pop("tokens"))

    tokens = a.batch * a.new
    print(
        f"greedy decoding, {source}: batch {a.batch} x prompt {a.prompt_len} (held-out stdlib) "
        f"+ {a.new} new tokens = {tokens} new tokens per call; "
        f"{jax.default_backend()}, median of {a.runs}"
    )
    head = f"{'decoder':<34} {'median s':>9} {'tokens/s':>9} {'vs plain':>8} {'mean acc':>9}"
    print(f"{head}  acceptance per depth   = plain")
    base = runs[0]["median_s"]
    for r in runs:
        d = r["num_draft_tokens"]
        name = "ours, plain" if d == 0 else f"ours, MTP speculative, {d} draft{'s' * (d > 1)}"
        acc = " ".join(f"{x:.2f}" for x in r["acceptance_per_depth"]) or "-"
        print(
            f"{name:<34} {r['median_s']:>9.3f} {r['tokens_per_s']:>9.0f} "
            f"{base / r['median_s']:>7.2f}x {r['mean_accepted_length']:>9.2f}  {acc:<21} "
            f"{'yes' if r['equals_plain'] else 'NO'}"
        )
    if hf is not None:
        ag = hf["agreement_with_ours"]
        name = f"transformers generate ({hf['threads']} thr)"
        print(
            f"{name:<34} {hf['median_s']:>9.3f} {hf['tokens_per_s']:>9.0f} "
            f"{base / hf['median_s']:>7.2f}x {'1.00':>9}  {'-':<21} "
            f"{ag['rows_equal']}/{a.batch} rows"
        )
        if ag["rows_equal"] < a.batch:
            first = ag["first_difference"]
            print(f"  transformers vs ours: first differing new token per row {first}")
    print_phases(runs)
    compile_s = [round(r["compile_plus_first_run_s"], 1) for r in runs]
    print(f"compile + first run, ours (s): {compile_s}")

    result = {
        "config": {k: v for k, v in vars(a).items() if k != "out"},
        "model": source,
        "new_tokens_per_call": tokens,
        "ours": runs,
        "transformers": hf,
        "backend": jax.default_backend(),
        "jax_version": jax.__version__,
        "host": common.host_info(),
    }
    bad = [r["num_draft_tokens"] for r in runs if not r["equals_plain"]]
    common.write_json(result, a.out)
    if bad:
        sys.exit(f"speculative greedy differs from plain greedy for num_draft_tokens={bad}")


if __name__ == "__main__":
    main()
