"""The DDP comm hooks on 2 gloo processes (CPU): equivalences with plain all-reduce, and training."""

import dataclasses
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
    assert set(compressed) == {"0.weight", "3.weight"}  # 5 is the output head: dense by default
    for step in range(5):  # the head's gradient is the plain mean of the workers'
        mean = sum(runs[r][step]["local:5.weight"] for r in range(WORLD)) / WORLD
        torch.testing.assert_close(runs[0][step]["5.weight"], mean, rtol=1e-5, atol=1e-7)
    errors_before = [{n: torch.zeros_like(runs[r][0][n]).reshape(runs[r][0][n].shape[0], -1) for n in compressed} for r in range(WORLD)]
    for step in range(5):
        for n in compressed:
            shape = runs[0][step][n].shape
            x = [runs[r][step][f"local:{n}"].reshape(shape[0], -1) + errors_before[r][n] for r in range(WORLD)]
            e = [runs[r][step].get(f"error:{n}", torch.zeros_like(x[r])) for r in range(WORLD)]
            applied = runs[0][step][n].reshape(shape[0], -1)
            # the mean of what the workers had to send = what was applied + the mean of what they kept
            torch.testing.assert_close(applied + sum(e) / WORLD, sum(x) / WORLD, rtol=1e-4, atol=1e-6)
            sent = [x[r] - e[r] for r in range(WORLD)]
            torch.testing.assert_close(sum(sent) / WORLD, applied, rtol=1e-4, atol=1e-6)
            if step in (2, 3):  # greedy steps: each worker's own buffer, not only their mean
                small = 0 if shape[0] <= sent[0].shape[1] else 1  # the side the shared basis spans
                for r in range(WORLD):
                    # worker r sent the orthogonal projection of its own X onto the shared basis and
                    # kept the rest: what it kept is orthogonal to what it sent (Pythagoras)
                    inner = (sent[r] * e[r]).sum()
                    assert abs(inner) <= 1e-4 * sent[r].norm() * e[r].norm(), (n, step, r, float(inner))
                    torch.testing.assert_close(sent[r].square().sum() + e[r].square().sum(), x[r].square().sum(), rtol=1e-4, atol=1e-8)
                    assert e[r].norm() > 0
                # every worker's sent part lies in the same rank-2 subspace of the smaller side
                both = torch.cat(sent, dim=1 - small)
                sv = torch.linalg.svdvals(both.double())
                assert sv[2] <= 1e-5 * sv[0], (n, step, sv[:4])
                assert not torch.allclose(e[0], e[1])  # two buffers of their own, not a shared one
            elif step in (1, 4):  # refresh: everything sent dense, nothing kept
                assert all(float(er.abs().max()) == 0 for er in e)
            for r in range(WORLD):
                errors_before[r][n] = e[r]
    assert any(runs[0][2][f"error:{n}"].abs().max() > 0 for n in compressed)  # the greedy steps did leave something


SEEDS = (0, 1, 2)


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
        results = []
        for seed in SEEDS:  # one process group, a fresh model, DDP and hook state per seed
            torch.manual_seed(seed)
            model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))
            ddp = DDP(model)
            state = LowRankHookState.for_model(model, compressor, rank=4, update_gap=40, warmup_steps=10) if compressor != "dense" else None
            if state is not None:
                ddp.register_comm_hook(state, lowrank_hook)
            opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
            g = torch.Generator().manual_seed(100 * (seed + 1) + rank)
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
            results.append({"acc": acc, "ratio": ratio, "weights": torch.cat([p.detach().flatten() for p in model.parameters()])})
            dist.barrier()
            del ddp, opt
        torch.save(results, os.path.join(out, f"train-{compressor}-{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_greedylore_training_on_digits_stays_near_dense_over_three_seeds(tmp_path):
    """GreedyLore's greedy pick is chaotic (one CPU model's rounding picks other directions), so
    one seed's accuracy says little: over 3 seeds every GreedyLore run learns (>= 80% where chance
    is 10% and dense reaches > 90%) and the mean stays within 6 points of dense's (measured: 0.4 to
    4 points below on Intel and AMD CPUs), sending under half the numbers. The replicas stay
    bitwise identical on every seed."""
    results = {}
    for comp in ("dense", "greedylore"):
        mp.spawn(_train_worker, args=(str(tmp_path / f"init-train-{comp}"), comp, str(tmp_path)), nprocs=WORLD)
        per_rank = [torch.load(tmp_path / f"train-{comp}-{r}.pt") for r in range(WORLD)]
        for a, b in zip(*per_rank):
            assert torch.equal(a["weights"], b["weights"]) and a["acc"] == b["acc"]  # the replicas stay identical
        results[comp] = per_rank[0]
    dense = [r["acc"] for r in results["dense"]]
    greedy = [r["acc"] for r in results["greedylore"]]
    assert min(dense) > 0.9, dense
    assert min(greedy) >= 0.8, greedy
    assert sum(greedy) / len(SEEDS) >= sum(dense) / len(SEEDS) - 0.06, (greedy, dense)
    assert max(r["ratio"] for r in results["greedylore"]) < 0.5  # and it sent under half the numbers


def test_hook_state_pickles_and_rejects_unknown_compressors():
    import pickle

    state = LowRankHookState.for_model(_model(), "powersgd", rank=2)
    again = pickle.loads(pickle.dumps(state))
    assert again.compressor == "powersgd" and again.options == state.options and again._names == {}
    assert state.options == {"rank": 2, "dense_patterns": ["*embed*", "*wte*", "*wpe*", "*lm_head*", "5.weight", "5.bias"]}
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
    for comp in ("none", "greedylore", "random", "torch-powersgd"):
        out = tmp_path / comp
        r = _rankfed("-q", "ddp", str(cfg), "--workers", "2", "--compressor", comp, "--rank", "2", "--steps", "30", "--eval-every", "10", "--warmup", "5", "--out", str(out))
        assert r.returncode == 0, r.stderr
        s = json.loads((out / "summary.json").read_text())
        rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
        evaluated = [r for r in rows if "accuracy" in r]
        assert [r["round"] for r in evaluated] == [10, 20, 30] and s["steps"] == 30 and len(s["mean_step_s_per_worker"]) == 2
        assert rows[-1]["cum_uplink_bytes"] == round(s["mean_bytes_per_step"] * 30)
        assert s["status"] == "completed" and (out / "model.pt").is_file() and not (out / "resume").exists()
        # rankfed's hooks hand every worker the same bits; PyTorch's powerSGD_hook does not always
        # (its replicas differed bitwise in CI with default threads), so there it is only reported
        assert s["replicas_identical"] or comp == "torch-powersgd"
        if comp in ("greedylore", "random"):  # a diagnostics line every step; none in the dense warm-up
            assert [r["round"] for r in rows] == list(range(1, 31)) and s["dense_matrices"] == ["fc3.weight"]
            assert all(r["captured_fraction"] is None and r["residual_ratio"] is None for r in rows[:5])
            assert all(0 < r["captured_fraction"] <= 1 and r["residual_ratio"] >= 0 for r in rows[5:])
        else:
            assert rows == evaluated and "captured_fraction" not in rows[0]
        runs.append(s)
    dense, greedy, rand, torch_psgd = runs
    assert dense["bytes_vs_dense"] == 1.0 and greedy["bytes_vs_dense"] < 0.6 and rand["bytes_vs_dense"] < 0.6 and torch_psgd["bytes_vs_dense"] < 0.6
    # the diagnostics lines have no accuracy: plot draws the evaluated ones
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


# -- resume points: a run stopped after N steps and resumed equals the uninterrupted one --------------

TIMING = {"wall_s", "step_s"}


def _tiny_model():
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))


def _tiny_data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 16, generator=g)
    y = (x @ torch.randn(16, 4, generator=g)).argmax(1)
    return (x[:192], y[:192]), (x[192:], y[192:])


def _rows(path):
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in path.read_text().splitlines()]


def test_adamw_greedylore_run_stopped_and_resumed_equals_the_uninterrupted_one(tmp_path):
    from rankfed.ddp.runner import DdpOptions, run_ddp
    from rankfed.local import LocalTraining

    # 96 samples a worker, batch 32: a new data order every 3 steps; refreshes at steps 4, 8, 12; eval and resume points every 5
    opts = DdpOptions(workers=2, compressor="greedylore", rank=2, warmup=3, update_gap=4, steps=14, eval_every=5, probes=2)
    local = LocalTraining(optimizer="adamw", lr=0.01, weight_decay=0.01, batch_size=32)
    whole = run_ddp(_tiny_model, _tiny_data, opts, tmp_path / "whole", local=local, seed=3)
    assert whole["status"] == "completed" and whole["replicas_identical"] and whole["optimizer"] == "adamw"
    assert whole["bytes_vs_dense"] < 1 and whole["dense_matrices"] == ["4.weight"]
    part = run_ddp(_tiny_model, _tiny_data, opts, tmp_path / "part", local=local, seed=3, stop_after=7)
    assert part["status"] == "stopped" and not (tmp_path / "part" / "summary.json").exists()
    latest = json.loads((tmp_path / "part" / "resume" / "latest.json").read_text())
    assert latest["step"] == 7 and sorted(p.name for p in (tmp_path / "part" / "resume").iterdir()) == ["latest.json", "step-00000007"]
    with pytest.raises(Exception, match="options differ.*rank = 3"):
        run_ddp(_tiny_model, _tiny_data, DdpOptions(**{**latest["options"], "rank": 3}), tmp_path / "part", local=local, seed=3, resume=True)
    resumed = run_ddp(_tiny_model, _tiny_data, opts, tmp_path / "part", local=local, seed=3, resume=True)
    assert resumed["status"] == "completed" and resumed["resumed_from_step"] == 7 and resumed["steps"] == 14
    a, b = (torch.load(tmp_path / d / "model.pt", weights_only=True) for d in ("whole", "part"))
    assert all(torch.equal(a[k], b[k]) for k in a)  # bitwise
    assert _rows(tmp_path / "part" / "metrics.jsonl") == _rows(tmp_path / "whole" / "metrics.jsonl")
    assert {k: v for k, v in resumed.items() if k in ("mean_bytes_per_step", "best_accuracy", "final_accuracy")} == {
        k: v for k, v in whole.items() if k in ("mean_bytes_per_step", "best_accuracy", "final_accuracy")
    }
    assert not (tmp_path / "part" / "resume").exists()  # finished: nothing left to resume


def test_rankfed_ddp_resume_continues_a_stopped_powersgd_run(tmp_path):
    from rankfed.app.cli import main
    from rankfed.app.config import load_config
    from rankfed.app.ddp import run_ddp_config
    from rankfed.ddp.runner import DdpOptions

    cfg_file = tmp_path / "exp.toml"
    cfg_file.write_text('[task]\ndataset = "digits"\nmodel = "mlp"\nmodel_options = {hidden = [32]}\n[client]\nlr = 0.05\nmomentum = 0.9\nbatch_size = 32\n')
    flags = ["--workers", "2", "--compressor", "powersgd", "--rank", "2", "--steps", "12", "--eval-every", "4", "--warmup", "2", "--checkpoint-every", "3"]
    r = _rankfed("-q", "ddp", str(cfg_file), *flags, "--out", str(tmp_path / "whole"))
    assert r.returncode == 0, r.stderr
    opts = DdpOptions(workers=2, compressor="powersgd", rank=2, steps=12, eval_every=4, warmup=2, checkpoint_every=3)
    part = run_ddp_config(load_config(cfg_file), opts, tmp_path / "part", stop_after=5)
    assert part["status"] == "stopped"
    assert main(["-q", "ddp", "--resume", str(tmp_path / "part"), "--rank", "3"]) == 2  # only --steps / --checkpoint-every may change
    r = _rankfed("-q", "ddp", "--resume", str(tmp_path / "part"))
    assert r.returncode == 0, r.stderr
    s = json.loads((tmp_path / "part" / "summary.json").read_text())
    assert s["resumed_from_step"] == 5 and s["status"] == "completed"
    a, b = (torch.load(tmp_path / d / "model.pt", weights_only=True) for d in ("whole", "part"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert _rows(tmp_path / "part" / "metrics.jsonl") == _rows(tmp_path / "whole" / "metrics.jsonl")
    assert main(["-q", "ddp", "--resume", str(tmp_path / "part")]) == 2  # finished: nothing to resume
    assert main(["-q", "ddp", str(cfg_file), "--compressor", "torch-powersgd", "--checkpoint-every", "5", "--out", str(tmp_path / "t")]) == 2


def test_rankfed_ddp_resume_refuses_what_it_cannot_continue(tmp_path, capsys):
    from rankfed.app.cli import main
    from rankfed.ddp.runner import DdpOptions

    run = tmp_path / "run"
    run.mkdir()
    assert main(["-q", "ddp", "--resume", str(run)]) == 2 and "not a run folder" in capsys.readouterr().err
    (run / "config.toml").write_text("")
    assert main(["-q", "ddp", "--resume", str(run)]) == 2 and "no resume point" in capsys.readouterr().err
    (run / "resume").mkdir()
    (run / "resume" / "latest.json").write_text(json.dumps({"format": 1, "step": 3, "workers": 2, "seed": 0, "options": dataclasses.asdict(DdpOptions())}))
    assert main(["-q", "ddp", "--resume", str(run)]) == 2 and "started from Python" in capsys.readouterr().err
    assert main(["-q", "ddp", "--resume", str(run), "--out", str(tmp_path / "x")]) == 2 and "give no CONFIG" in capsys.readouterr().err
