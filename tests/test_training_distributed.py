"""Distributed exactness: 2 gloo processes on CPU with local batch 4 give the gradients of one process with
batch 8, through DDP, GradCache with no_sync, and queries/positives/negatives gathered across ranks.

The test launches this file as 2 workers with torchrun (`python -m torch.distributed.run --standalone`: it
picks the rendezvous port itself and stops every worker when one fails; see `torchrun`). Dropout is off: two
processes cannot draw the masks one process draws.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import torch

CLASSIFY = "Represent the given image for classification."
WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def global_batch():
    """8 queries, 8 positives, and hard negatives per rank: 2 on rank 0, 1 on rank 1 (uneven on purpose)."""
    from vlm2vec_rt import Item
    from vlm2vec_rt.sample_images import digits

    images, labels = digits()
    queries = [Item(image=images[i], instruction=CLASSIFY) for i in range(8)]
    queries[5] = Item(text="the digit after four", instruction=CLASSIFY)
    targets = [Item(text=WORDS[int(labels[i])]) for i in range(8)]
    negatives = [[Item(text="a photo of a dog"), Item(image=images[50])], [Item(text="eleven")]]
    return queries, targets, negatives


def lora_backbone(model_dir: str):
    from vlm2vec_rt.models.backbones import load_backbone
    from vlm2vec_rt.training.lora import add_adapter

    bb = load_backbone(model_dir)
    torch.manual_seed(0)
    add_adapter(bb, r=4, dropout=0.0, init_b_std=0.05)  # the adapter acts: every gradient is non-zero
    return bb


def encoder(bb, module):
    return lambda items: module(bb.to_device(bb.pre.collate(bb.pre.prepare_many(items))))


def worker(model_dir: str, out: str) -> None:
    """One rank: its slice of the global batch, DDP + GradCache (chunk 3: several no_sync chunks)."""
    from safetensors.torch import save_file

    from vlm2vec_rt import distributed
    from vlm2vec_rt.training import grad_cache_step
    from vlm2vec_rt.training.trainer import EmbeddingModel

    torch.set_num_threads(1)
    with distributed.joined("cpu"):  # leaves the group together with the other rank
        rank, world = distributed.rank(), distributed.world_size()
        bb = lora_backbone(model_dir)
        ddp = torch.nn.parallel.DistributedDataParallel(EmbeddingModel(bb), forward_sync_buffers=False)
        queries, targets, negatives = global_batch()
        local = len(queries) // world
        mine = slice(rank * local, (rank + 1) * local)
        loss = grad_cache_step(
            encoder(bb, ddp),
            queries[mine],
            targets[mine],
            negatives=negatives[rank],
            chunk_size=3,
            no_sync=ddp.no_sync,
        )
        grads = {n: p.grad.contiguous() for n, p in bb.model.named_parameters() if p.requires_grad}
        grads["loss"] = torch.tensor([loss])
        save_file(grads, os.path.join(out, f"rank{rank}.safetensors"))
        del ddp  # the DDP wrapper holds the group: drop it before the group goes


TRAIN_SETTINGS = dict(
    steps=3, batch_size=8, gc_chunk=3, lr=1e-4, lora_r=4, lora_dropout=0.0, checkpoint_every=2
)


def train_worker(model_dir: str, data_dir: str, out: str) -> None:
    """One rank of `vlm2vec-rt train` under torchrun's environment."""
    from vlm2vec_rt.training.trainer import train

    torch.set_num_threads(1)
    train(model_dir, data_dir, out, **TRAIN_SETTINGS)


def torchrun(script: str | os.PathLike, args: list[str], *, timeout: float = 240, nproc: int = 2) -> str:
    """Run `script args` as nproc CPU ranks under torchrun; its output. A failed rank fails the call (torchrun
    stops the others). Past `timeout` seconds torchrun and every worker are stopped, so a hung rank costs
    the timeout and leaks no process (torchrun starts each worker in a session of its own, out of reach of
    a signal to torchrun's process group: they are found through /proc)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    proc = subprocess.Popen(
        [*cmd, os.fspath(script), *args],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _stop_tree(proc)
        output, _ = proc.communicate()
        raise AssertionError(f"torchrun still running after {timeout} s: stopped\n{output[-3000:]}") from None
    finally:
        if proc.poll() is None:  # interrupted (Ctrl-C) while waiting
            _stop_tree(proc)
    assert proc.returncode == 0, output[-3000:]
    return output


def _stat(pid: int | str) -> list[str] | None:
    """/proc/<pid>/stat's fields after the command name (state, ppid, ...), or None when it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def _descendants(pid: int) -> dict[int, str]:
    """pid -> start time of every process below pid (the start time tells a reused pid apart)."""
    children: dict[int, list[tuple[int, str]]] = {}
    for entry in Path("/proc").iterdir():
        fields = _stat(entry.name) if entry.name.isdigit() else None
        if fields:
            children.setdefault(int(fields[1]), []).append((int(entry.name), fields[19]))
    found, todo = {}, [pid]
    while todo:
        for child, started in children.get(todo.pop(), []):
            found[child] = started
            todo.append(child)
    return found


def _stop_tree(proc: subprocess.Popen) -> None:
    """SIGTERM to torchrun (it stops its workers), then SIGKILL to whatever of the tree is left."""
    workers = _descendants(proc.pid)
    proc.terminate()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=15)
    for pid, started in workers.items():
        fields = _stat(pid)
        if fields and fields[19] == started:  # still the worker we found, not a pid used again
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    proc.kill()
    proc.wait()


def _launch(args: list[str]) -> None:
    """Run this file as 2 ranks."""
    torchrun(__file__, args)


def test_two_gloo_ranks_equal_one_process(tmp_path, tiny_qwen):
    from safetensors.torch import load_file

    from vlm2vec_rt import ops

    _launch(["grads", tiny_qwen, str(tmp_path)])

    # the reference: one process, the whole batch of 8 in one forward, all negatives (rank 0's, then rank 1's)
    bb = lora_backbone(tiny_qwen)
    queries, targets, negatives = global_batch()
    encode = encoder(bb, bb.forward)
    q, t = encode(queries), encode(targets + negatives[0] + negatives[1])
    loss = ops.info_nce(q, t, temperature=0.02, backend="torch")
    loss.backward()
    want = {n: p.grad for n, p in bb.model.named_parameters() if p.requires_grad}

    for r in range(2):
        got = load_file(Path(tmp_path) / f"rank{r}.safetensors")
        assert abs(float(got.pop("loss")) - float(loss)) < 1e-5 * float(loss)
        assert got.keys() == want.keys()
        num = sum(float((got[k] - want[k]).double().pow(2).sum()) for k in want)
        den = sum(float(want[k].double().pow(2).sum()) for k in want)
        assert den > 0 and (num / den) ** 0.5 < 1e-5, (
            f"rank {r}: relative difference {(num / den) ** 0.5:.2e}"
        )


def test_trainer_on_two_ranks_follows_one_process(tmp_path, tiny_qwen):
    """The trainer under torchrun (2 gloo ranks, local batch 4): same losses and nearly the same adapter as one
    process with batch 8 (AdamW normalises gradients, so tiny float differences may move single elements a
    little); checkpoints hold both ranks' RNG states."""
    import json

    from safetensors.torch import load_file
    from test_training import write_digit_set

    from vlm2vec_rt.training.checkpoint import latest_checkpoint, load_checkpoint
    from vlm2vec_rt.training.trainer import train

    data = write_digit_set(tmp_path / "data", 40)
    _launch(["train", tiny_qwen, str(data), str(tmp_path / "two")])
    train(tiny_qwen, data, tmp_path / "one", **TRAIN_SETTINGS)

    def losses(run):
        return [
            json.loads(line)["loss"] for line in (tmp_path / run / "train_log.jsonl").read_text().splitlines()
        ]

    assert len(losses("two")) == 3
    for a, b in zip(losses("two"), losses("one")):
        assert abs(a - b) < 1e-4 * b
    two = load_file(tmp_path / "two" / "adapter" / "adapter_model.safetensors")
    one = load_file(tmp_path / "one" / "adapter" / "adapter_model.safetensors")
    b_keys = [k for k in one if "lora_B" in k]  # B starts at zero: it holds exactly what training moved
    num = sum(float((two[k] - one[k]).pow(2).sum()) for k in b_keys)
    den = sum(float(one[k].pow(2).sum()) for k in b_keys)
    assert den > 0 and (num / den) ** 0.5 < 1e-3
    assert len(load_checkpoint(latest_checkpoint(tmp_path / "two")).rng) == 2


_DIES = """
import os, sys
if os.environ["RANK"] == "0":
    sys.exit(3)  # gone before the rendezvous
import torch.distributed as dist
dist.init_process_group("gloo")  # rank 1 would wait here for rank 0 (30 minutes by default)
"""


def _processes_mentioning(marker: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker.encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


def test_launcher_fails_fast_and_leaves_no_rank_behind(tmp_path):
    """Rank 0 dies while rank 1 waits for it, or every rank hangs: the launch fails (at once, or at its
    timeout) and no worker outlives it."""
    import time

    import pytest

    dies, hangs = tmp_path / "dies_on_rank0.py", tmp_path / "hangs.py"
    dies.write_text(_DIES)
    hangs.write_text("import time\ntime.sleep(600)\n")
    started = time.monotonic()
    with pytest.raises(AssertionError, match="exitcode"):
        torchrun(dies, [], timeout=120)
    assert time.monotonic() - started < 100
    started = time.monotonic()
    with pytest.raises(AssertionError, match="still running after 5 s"):
        torchrun(hangs, [], timeout=5)
    assert time.monotonic() - started < 60
    assert _processes_mentioning(str(dies)) == _processes_mentioning(str(hangs)) == []


if __name__ == "__main__":
    if sys.argv[1] == "grads":
        worker(sys.argv[2], sys.argv[3])
    else:
        train_worker(sys.argv[2], sys.argv[3], sys.argv[4])
