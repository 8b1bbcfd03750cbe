"""The DDP comm hooks on 2 gloo processes (CPU): equivalences with plain all-reduce, and training."""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from rankfed.ddp import LowRankHookState, greedylore_hook, lowrank_hook

WORLD = 2


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 24, 3), nn.ReLU(), nn.Flatten(), nn.Linear(24 * 6 * 6, 40), nn.ReLU(), nn.Linear(40, 3))


def _grad_worker(rank, init_file, mode, out, steps):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        model = _model()
        ddp = DDP(model)
        if mode == "none":
            ddp.register_comm_hook(LowRankHookState.for_model(model, "none"), lowrank_hook)
        elif mode == "greedylore-r2":
            state = LowRankHookState.for_model(model, "greedylore", rank=2, update_gap=3, warmup_steps=1, min_saving=0)
            ddp.register_comm_hook(state, greedylore_hook)
        elif mode == "greedylore-full":
            # every 2-D weight compressed (min_saving 0) at a rank >= min(n, m)
            state = LowRankHookState.for_model(model, "greedylore", rank=64, update_gap=2, warmup_steps=0, min_saving=0)
            ddp.register_comm_hook(state, greedylore_hook)
        g = torch.Generator().manual_seed(rank)
        local = _model()  # the same weights without DDP: this worker's own gradient
        grads = []
        for _ in range(steps):  # no optimiser step: the same weights, new data each step
            x = torch.randn(16, 2, 8, 8, generator=g)
            y = torch.randint(0, 3, (16,), generator=g)
            ddp.zero_grad()
            F.cross_entropy(ddp(x), y).backward()
            local.zero_grad()
            F.cross_entropy(local(x), y).backward()
            record = {n: p.grad.clone() for n, p in model.named_parameters()}
            record.update({f"local:{n}": p.grad.clone() for n, p in local.named_parameters()})
            if mode == "greedylore-r2":
                record.update({f"error:{n}": e.clone() for n, e in state.lowrank.error.items()})
            grads.append(record)
        torch.save(grads, os.path.join(out, f"{mode}-{rank}.pt"))
        dist.barrier()
        del ddp  # the reducer before the group (see rankfed.ddp.runner)
    finally:
        dist.destroy_process_group()


def _grads(tmp_path, mode, steps=3):
    mp.spawn(_grad_worker, args=(str(tmp_path / f"init-{mode}"), mode, str(tmp_path), steps), nprocs=WORLD)
    return [torch.load(tmp_path / f"{mode}-{r}.pt") for r in range(WORLD)]


@pytest.mark.parametrize("mode", ["none", "greedylore-full"])
def test_hook_equals_plain_allreduce(tmp_path, mode):
    plain = _grads(tmp_path, "plain")
    hooked = _grads(tmp_path, mode)
    for rank in range(WORLD):
        for step in range(3):  # greedylore-full: refresh, projected, refresh
            for name, value in plain[rank][step].items():
                torch.testing.assert_close(hooked[rank][step][name], value, rtol=1e-4, atol=1e-6)


def test_error_buffer_is_what_was_not_sent_on_two_processes(tmp_path):
    runs = _grads(tmp_path, "greedylore-r2", steps=5)  # step 0 dense warm-up, 1 and 4 refresh, 2 and 3 greedy
    compressed = [k.split(":", 1)[1] for k in runs[0][-1] if k.startswith("error:")]
    assert set(compressed) == {"0.weight", "3.weight", "5.weight"}
    errors_before = [{n: torch.zeros_like(runs[r][0][n]).reshape(runs[r][0][n].shape[0], -1) for n in compressed} for r in range(WORLD)]
    for step in range(5):
        for n in compressed:
            shape = runs[0][step][n].shape
            x = [runs[r][step][f"local:{n}"].reshape(shape[0], -1) + errors_before[r][n] for r in range(WORLD)]
            e = [runs[r][step].get(f"error:{n}", torch.zeros_like(x[r])) for r in range(WORLD)]
            applied = runs[0][step][n].reshape(shape[0], -1)
            # the mean of what the workers had to send = what was applied + the mean of what they kept
            torch.testing.assert_close(applied + sum(e) / WORLD, sum(x) / WORLD, rtol=1e-4, atol=1e-6)
            for r in range(WORLD):
                errors_before[r][n] = e[r]
    assert any(runs[0][2][f"error:{n}"].abs().max() > 0 for n in compressed)  # the greedy steps did leave something


def _train_worker(rank, init_file, compressor, out):
    from sklearn.datasets import load_digits

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        d = load_digits()
        x = torch.tensor(d.data, dtype=torch.float32) / 16.0
        y = torch.tensor(d.target)
        perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
        test, train = perm[:400], perm[400:]
        mine = train[rank::WORLD]  # each worker its half
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))
        ddp = DDP(model)
        state = LowRankHookState.for_model(model, compressor, rank=4, update_gap=40, warmup_steps=10) if compressor != "dense" else None
        if state is not None:
            ddp.register_comm_hook(state, lowrank_hook)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
        g = torch.Generator().manual_seed(100 + rank)
        for _ in range(15):  # epochs
            order = mine[torch.randperm(len(mine), generator=g)]
            for i in range(0, len(order) - 31, 32):
                idx = order[i : i + 32]
                opt.zero_grad()
                F.cross_entropy(ddp(x[idx]), y[idx]).backward()
                opt.step()
        with torch.no_grad():
            acc = (model(x[test]).argmax(1) == y[test]).float().mean().item()
        ratio = state.lowrank.stats.ratio if state is not None else 1.0
        torch.save({"acc": acc, "ratio": ratio}, os.path.join(out, f"train-{compressor}-{rank}.pt"))
        dist.barrier()
        del ddp, opt
    finally:
        dist.destroy_process_group()


def test_greedylore_training_on_digits_is_within_two_points_of_dense(tmp_path):
    results = {}
    for comp in ("dense", "greedylore"):
        mp.spawn(_train_worker, args=(str(tmp_path / f"init-train-{comp}"), comp, str(tmp_path)), nprocs=WORLD)
        per_rank = [torch.load(tmp_path / f"train-{comp}-{r}.pt") for r in range(WORLD)]
        assert per_rank[0]["acc"] == per_rank[1]["acc"]  # the replicas stay identical
        results[comp] = per_rank[0]
    assert results["dense"]["acc"] > 0.9
    assert results["greedylore"]["acc"] >= results["dense"]["acc"] - 0.02
    assert results["greedylore"]["ratio"] < 0.5  # and it sent under half the numbers


def test_hook_state_pickles_and_rejects_unknown_compressors():
    import pickle

    state = LowRankHookState.for_model(_model(), "powersgd", rank=2)
    again = pickle.loads(pickle.dumps(state))
    assert again.compressor == "powersgd" and again.options == {"rank": 2} and again._names == {}
    with pytest.raises(ValueError, match="compressor 'topk'"):
        LowRankHookState("topk")


def _rankfed(*args: str) -> subprocess.CompletedProcess:
    """`rankfed ...` in its own process, as a user runs it (worker processes spawned from
    inside pytest's captured process have aborted in gloo's teardown on some runs)."""
    return subprocess.run([sys.executable, "-m", "rankfed", *args], capture_output=True, text=True, timeout=600)


def test_rankfed_ddp_writes_a_run_folder_that_plot_reads(tmp_path):
    from rankfed.app.cli import main

    cfg = tmp_path / "exp.toml"
    cfg.write_text('[task]\ndataset = "digits"\nmodel = "mlp"\n[client]\nlr = 0.05\nmomentum = 0.9\nbatch_size = 32\n')
    runs = []
    for comp in ("none", "greedylore", "torch-powersgd"):
        out = tmp_path / comp
        r = _rankfed("-q", "ddp", str(cfg), "--workers", "2", "--compressor", comp, "--rank", "2", "--steps", "30", "--eval-every", "10", "--warmup", "5", "--out", str(out))
        assert r.returncode == 0, r.stderr
        s = json.loads((out / "summary.json").read_text())
        rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
        assert [r["round"] for r in rows] == [10, 20, 30] and s["steps"] == 30 and len(s["mean_step_s_per_worker"]) == 2
        assert rows[-1]["cum_uplink_bytes"] == round(s["mean_bytes_per_step"] * 30)
        runs.append(s)
    dense, greedy, torch_psgd = runs
    assert dense["bytes_vs_dense"] == 1.0 and greedy["bytes_vs_dense"] < 0.6 and torch_psgd["bytes_vs_dense"] < 0.6
    assert main(["-q", "plot", str(tmp_path / "none"), str(tmp_path / "greedylore"), "--out", str(tmp_path / "p.png")]) == 0
    assert (tmp_path / "p.png").stat().st_size > 0
    assert main(["-q", "ddp", str(cfg), "--compressor", "topk", "--out", str(tmp_path / "bad")]) == 2


def test_rankfed_ddp_stops_a_diverging_run_cleanly(tmp_path):
    cfg = tmp_path / "exp.toml"
    cfg.write_text('[task]\ndataset = "digits"\nmodel = "mlp"\n[client]\nlr = 1e30\nbatch_size = 32\n')
    out = tmp_path / "run"
    r = _rankfed("-q", "ddp", str(cfg), "--workers", "2", "--compressor", "greedylore", "--steps", "40", "--warmup", "1", "--update-gap", "2", "--out", str(out))
    assert r.returncode == 0, r.stderr
    s = json.loads((out / "summary.json").read_text())
    assert s["status"] == "diverged" and 1 <= s["diverged_at_step"] <= 40 and s["final_accuracy"] is None
    assert "diverged at step" in r.stderr
