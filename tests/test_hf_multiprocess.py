"""``load_hf`` under ``jax.distributed``: each process reads only what its own devices hold.

Two processes with 4 fake CPU devices each (localhost coordinator, as in tests/test_sharding.py)
load the FP8 hub-format checkpoint of tests/test_hf_sharded.py onto one global 8-device mesh
(``fsdp_ep`` on (1, 2, 4, 1): every expert weight split 8 ways, with no replica), counting the
bytes each reads through ``Checkpoint.read_box``. A third process with all 8 devices loads it
alone. Each process writes what it read, a digest of every shard it holds and the gathered
logits of one forward pass; the two halves together must be the single process, bit for bit.
"""

import json
import subprocess

import numpy as np
import process_testing
from test_hf_sharded import CFG, EXPERT, make_hub

from mimo_jax import hf_slices

MESH, PRESET = (1, 2, 4, 1), "fsdp_ep"

# argv: checkpoint, output prefix, coordinator address ("" for a single process), process id.
_CHILD = f"""
import hashlib, json, sys
import jax
path, out, coordinator, pid = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
if coordinator:
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=2, process_id=pid)
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from mimo_jax import hf, hf_slices, sharding as sh

reads = []
read_box = hf_slices.Checkpoint.read_box
def counting(self, name, box):
    x = read_box(self, name, box)
    reads.append([name, [[s.start, s.stop] for s in box].__repr__(), x.nbytes])
    return x
hf_slices.Checkpoint.read_box = counting

with sh.use_mesh(sh.make_mesh({MESH}), "{PRESET}"):
    model = hf.load_hf(path)
    shards = {{}}
    for p, var in nnx.to_flat_state(nnx.state(model)):
        for s in var.get_value().addressable_shards:
            key = ".".join(map(str, p)) + str(s.index)
            shards[key] = hashlib.sha256(np.asarray(s.data).tobytes()).hexdigest()
    ids = np.arange(8 * 16).reshape(8, 16) * 7 % {CFG.vocab_size}  # [B, T]
    logits = nnx.jit(lambda m, x: m(x).logits)(model, sh.put_batch(ids))  # [B, T, V]
    logits = multihost_utils.process_allgather(logits, tiled=True)
with open(out + ".json", "w") as f:
    json.dump({{"reads": reads, "shards": shards}}, f)
np.save(out + ".npy", np.asarray(logits))
"""


def _launch(devices: int, *args) -> subprocess.Popen:
    return process_testing.launch(devices, ["-c", _CHILD, *map(str, args)])


def _result(prefix) -> tuple[dict, dict[str, int], dict[str, set], np.ndarray]:
    """(shard digests, bytes read per tensor, boxes read per tensor, logits) of one process."""
    with open(f"{prefix}.json") as f:
        r = json.load(f)
    nbytes, boxes = {}, {}
    for name, box, n in r["reads"]:
        nbytes[name] = nbytes.get(name, 0) + n
        boxes.setdefault(name, set()).add(box)
    return r["shards"], nbytes, boxes, np.load(f"{prefix}.npy")


def test_two_processes_read_their_halves_and_equal_one(tmp_path):
    path = make_hub(tmp_path, CFG)
    port = process_testing.free_port()
    procs = [_launch(4, path, tmp_path / f"p{i}", f"localhost:{port}", i) for i in range(2)]
    procs.append(_launch(8, path, tmp_path / "single", "", 0))
    for p in procs:
        out, _ = p.communicate(timeout=600)
        assert p.returncode == 0, out[-3000:]
    (shards0, bytes0, boxes0, logits0), (shards1, bytes1, boxes1, logits1) = (
        _result(tmp_path / f"p{i}") for i in range(2)
    )
    shards, nbytes, boxes, logits = _result(tmp_path / "single")

    # Together the two processes read exactly the slices one process reads, ...
    assert boxes0.keys() | boxes1.keys() == boxes.keys()
    for name in boxes:
        assert boxes0.get(name, set()) | boxes1.get(name, set()) == boxes[name], name
    # ... each expert weight's bytes once between them, half of all expert bytes each, ...
    ckpt = hf_slices.Checkpoint(path)
    experts = [n for n in ckpt.meta if EXPERT.search(n) and n.endswith(".weight")]
    assert len(experts) == 2 * 8 * 3
    for name in experts:
        whole = ckpt.read(name).nbytes
        assert bytes0.get(name, 0) + bytes1.get(name, 0) == whole, name
        assert bytes0.get(name, 0) < whole and bytes1.get(name, 0) < whole, name
    expert_total = sum(ckpt.read(n).nbytes for n in experts)
    assert sum(bytes0[n] for n in experts) == sum(bytes1[n] for n in experts) == expert_total // 2
    # ... and each well under what one process reads (only replicated tensors are read by both).
    total = sum(nbytes.values())
    kib = lambda n: f"{n / 2**10:.0f} KiB"  # noqa: E731
    print(
        f"read: process 0 {kib(sum(bytes0.values()))}, process 1 {kib(sum(bytes1.values()))}, "
        f"one process {kib(total)} (expert weights {kib(expert_total)})"
    )
    for b in (bytes0, bytes1):
        assert sum(b.values()) < 0.6 * total, (sum(b.values()), total)

    # Every shard each process holds (keyed by parameter and index) is bit for bit the single
    # process's, and together they are all of them; the forward pass agrees.
    assert all(shards0[k] == shards1[k] for k in shards0.keys() & shards1.keys())  # replicas
    assert {**shards0, **shards1} == shards
    assert len(shards0) < len(shards) and len(shards1) < len(shards)
    np.testing.assert_array_equal(logits0, logits)
    np.testing.assert_array_equal(logits1, logits)
