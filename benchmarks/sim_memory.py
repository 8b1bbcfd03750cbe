"""Simulator memory at 1,000 and 10,000 clients (issue 10).

The simulator must not keep a model per client: one worker model is reused for every
client, a stateful federation keeps one replica for all clients, and only algorithms that
need client state keep it (pFedLoRU's personal factors, an uplink compressor's error
feedback), and only for the clients that have taken part. This measures it.

Each (model, setup, number of clients) runs in a fresh subprocess, so its peak RSS is its
own. The child builds the experiment (``load_config(None, overrides)`` +
``build_experiment``), builds the simulator, runs ``--rounds`` rounds with
``--participation`` of the clients each (the last round is evaluated, for pFedLoRU also
every client's personal model), and reports, from ``/proc/self/status``:

* the floor: VmHWM of a bare ``import torch, rankfed`` process;
* RSS after ``build_experiment`` + ``exp.simulator()`` (data loaded and split, models built);
* the peak of the whole run (VmHWM) and the peak of the training rounds alone (VmHWM reset
  through ``/proc/self/clear_refs`` after the build, so loading the data does not mask it);
* the bytes of the data tensors (the dataset's splits, and the clients' own copies), the
  model's parameter bytes, the clients with state and the bytes of their state (tensor
  nbytes in ``sim.client_states``, and the bytes of the distinct storages behind them, which
  would show a small view keeping a large buffer alive);
* per client: (peak - floor - data) / clients, and, between the two client counts, the
  marginal bytes of one more client.

A setup whose algorithm should keep no client state is flagged when it keeps some, or when
its marginal cost per client reaches half a model (a per-client model copy). Writes a
markdown report to ``results/sim_memory.md`` and its section of RESULTS.md (or only to ``--out``).

    .venv/bin/python benchmarks/sim_memory.py --clients 1000,10000 --rounds 3
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _report import write_result  # noqa: E402
MiB = 1 << 20

# name -> (algorithm overrides, whether the algorithm is meant to keep per-client state, what it keeps)
SETUPS: dict[str, tuple[list[str], bool, str]] = {
    "fedavg": (['algorithm.name="fedavg"'], False, "nothing"),
    "fedavg+topk+ef": (
        ['algorithm.name="fedavg"', 'algorithm.compressor="topk"', "algorithm.topk_ratio=0.01", "algorithm.error_feedback=true"],
        True,
        "error-feedback residual (dense, one model)",
    ),
    "fedavg+greedylore": (
        ['algorithm.name="fedavg"', 'algorithm.compressor="greedylore"', "algorithm.compress_rank=4"],
        True,
        "residual + SVD basis per matrix",
    ),
    "mapa": (['algorithm.name="mapa"'], False, "nothing (stateful: one shared replica)"),
    "fedloru": (['algorithm.name="fedloru"'], False, "nothing (stateful: one shared replica)"),
    "pfedloru": (['algorithm.name="pfedloru"', "algorithm.personal_rank=8"], True, "personal factors L, U"),
}
DEFAULT_SETUPS = ",".join(SETUPS)
# the larger model: a wide MLP on the same data (no CIFAR-shaped data ships with the machine)
BIG_DEFAULT_SETUPS = "fedavg,fedavg+topk+ef,mapa,pfedloru"


def status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def rss_mib() -> float:
    return status_kib("VmRSS") / 1024


def hwm_mib() -> float:
    return status_kib("VmHWM") / 1024


def reset_hwm() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where the kernel refuses."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


# --------------------------------------------------------------------------- child: one measurement


def tensors_in(obj, seen: set[int] | None = None):
    """Every tensor reachable from ``obj`` through dicts, lists, tuples, sets and dataclasses."""
    import torch

    seen = set() if seen is None else seen
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from tensors_in(v, seen)
    elif isinstance(obj, (list, tuple, set, frozenset)):
        for v in obj:
            yield from tensors_in(v, seen)
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            yield from tensors_in(getattr(obj, f.name), seen)


def state_bytes(states: dict) -> tuple[int, int, int]:
    """(tensor nbytes, distinct storage bytes, tensor count) of the client states."""
    nbytes = storage = count = 0
    storages: set[int] = set()
    for t in tensors_in(states):
        count += 1
        nbytes += t.numel() * t.element_size()
        s = t.untyped_storage()
        if s.data_ptr() not in storages:
            storages.add(s.data_ptr())
            storage += s.nbytes()
    return nbytes, storage, count


def child_floor() -> dict:
    import torch  # noqa: F401

    import rankfed  # noqa: F401

    return {"hwm_mib": hwm_mib(), "rss_mib": rss_mib()}


def child_run(spec: dict) -> dict:
    import torch

    import rankfed  # noqa: F401
    from rankfed.app.config import load_config
    from rankfed.app.experiment import build_experiment

    torch.set_num_threads(spec["threads"])
    out: dict = {"rss_import_mib": rss_mib()}
    cfg = load_config(None, spec["overrides"])
    t0 = time.perf_counter()
    exp = build_experiment(cfg)
    sim = exp.simulator()
    out["build_s"] = time.perf_counter() - t0
    ds = exp.dataset
    out["dataset_bytes"] = sum(t.numel() * t.element_size() for t in (ds.train_x, ds.train_y, ds.test_x, ds.test_y))
    out["client_data_bytes"] = sum(t.numel() * t.element_size() for c in exp.clients for t in (c.x, c.y, c.val_x, c.val_y))
    out["param_bytes"] = sum(p.numel() * p.element_size() for p in exp.model.parameters())
    out["num_params"] = sum(p.numel() for p in exp.model.parameters())
    out["client_kind"] = sim.client_kind
    out["clients_per_round"] = sim.clients_per_round
    out["rss_built_mib"] = rss_mib()
    out["hwm_build_mib"] = hwm_mib()
    out["hwm_reset"] = reset_hwm()
    participated: set[int] = set()
    t0 = time.perf_counter()
    per_round = []
    for rnd in range(1, cfg.federation.rounds + 1):
        rec = sim.run_round(rnd)
        participated.update(rec.clients)
        per_round.append({"round": rnd, "rss_mib": rss_mib(), "hwm_mib": hwm_mib(), "round_s": rec.round_s, "eval_s": rec.eval_s})
    out["train_s"] = time.perf_counter() - t0
    out["rounds"] = per_round
    out["hwm_train_mib"] = hwm_mib()  # since the reset: the rounds alone
    out["rss_end_mib"] = rss_mib()
    out["participated"] = len(participated)
    out["clients_with_state"] = len(sim.client_states)
    out["state_bytes"], out["state_storage_bytes"], out["state_tensors"] = state_bytes(sim.client_states)
    out["accuracy"] = sim.history[-1].accuracy
    out["personal_accuracy"] = sim.history[-1].personal_accuracy
    return out


# --------------------------------------------------------------------------- parent: the sweep


def overrides_for(model: str, setup: str, clients: int, args) -> list[str]:
    algo, _, _ = SETUPS[setup]
    o = [
        'task.dataset="fmnist"',
        'task.partition="iid"',
        "task.holdout=0.1",
        f"federation.clients={clients}",
        f"federation.participation={args.participation}",
        f"federation.rounds={args.rounds}",
        f"federation.eval_every={args.rounds}",
        "federation.resume_every=0",
        "federation.seed=0",
        "client.lr=0.05",
        "client.batch_size=32",
        "client.epochs=1",
        *algo,
    ]
    if model == "cnn2":
        o.append('task.model="cnn2"')
    else:  # the wide MLP: factorise its hidden layers (the LoRA default, "*conv*", matches nothing)
        hidden = [int(h) for h in args.mlp_hidden.split(",")]
        o += ['task.model="mlp"', f"task.model_options={{ hidden = {hidden} }}"]
        if SETUPS[setup][0][0] in ('algorithm.name="fedloru"', 'algorithm.name="pfedloru"'):
            o += ['algorithm.patterns=["fc1", "fc2"]', "algorithm.exclude=[]"]
    return o


def run_child(payload: dict, timeout: float, mmap_threshold: int = 0) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(payload)]
    env = dict(os.environ, OMP_NUM_THREADS=str(payload.get("threads", 1)), PYTHONHASHSEED="0")
    if mmap_threshold > 0:
        env["MALLOC_MMAP_THRESHOLD_"] = str(mmap_threshold)
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        tail = (p.stderr or p.stdout).strip().splitlines()[-3:]
        why = "killed (out of memory?)" if p.returncode in (-9, 137) else f"exit {p.returncode}"
        return {"error": f"{why}: {' | '.join(tail)}", "wall_s": wall}
    res = json.loads(p.stdout.strip().splitlines()[-1])
    res["wall_s"] = wall
    return res


def fmt_mib(b: float) -> str:
    return f"{b / MiB:,.1f}"


def fmt_bytes(b: float) -> str:
    if abs(b) >= MiB:
        return f"{b / MiB:,.2f} MiB"
    if abs(b) >= 1024:
        return f"{b / 1024:,.1f} KiB"
    return f"{b:,.0f} B"


def peak_of(r: dict) -> float:
    return max(r["hwm_build_mib"], r["hwm_train_mib"])


def working_set(r: dict) -> float:
    """Bytes the rounds needed beyond the built experiment and the client state they left, per
    client sampled in a round: the round's transient memory (uploads held until aggregation,
    training, evaluation)."""
    return ((r["hwm_train_mib"] - r["rss_built_mib"]) * MiB - r["state_bytes"]) / r["clients_per_round"]


def flag_for(r: dict) -> str:
    """Per run: state kept by an algorithm that should keep none, or how big the state is."""
    if "error" in r:
        return ""
    keeps = SETUPS[r["setup"]][1]
    swc, pb = r["clients_with_state"], r["param_bytes"]
    if not keeps and swc:
        return f"**keeps state for {swc} clients ({fmt_bytes(r['state_bytes'])}), should keep none**"
    if keeps and swc:
        ratio = r["state_bytes"] / swc / pb
        return f"{ratio:.2f} model / client with state ({SETUPS[r['setup']][2]})" if ratio >= 0.5 else f"compact ({ratio:.2f} model / client)"
    return "no client state"


def marginal_flag(setup: str, per_client: float, per_sampled: float, model: int) -> str:
    """Between two client counts: a per-client model copy, or a round that grows with its cohort."""
    out = []
    if per_client >= 0.5 * model and not SETUPS[setup][1]:
        out.append(f"**{per_client / model:.2f} model per added client: a per-client copy**")
    if per_sampled >= 0.5 * model:
        out.append(f"**round grows {per_sampled / model:.1f} model per sampled client**")
    return "; ".join(out) or "ok"


def report(args, floor: dict, results: list[dict]) -> str:
    lines = []
    fl = floor["hwm_mib"]
    alloc = (
        f"glibc malloc with MALLOC_MMAP_THRESHOLD_={args.mmap_threshold}"
        if args.mmap_threshold
        else "glibc malloc defaults (a freed block is often kept by the allocator, so RSS can exceed the live bytes)"
    )
    lines.append(
        f"Fashion-MNIST (60,000 training images, iid; with 10,000 clients 6 each, 1 of them held out), {args.rounds} rounds, "
        f"participation {args.participation:g} (clients sampled per round = participation x clients), batch 32, 1 local epoch, "
        f"the last round evaluated (pFedLoRU: every client's personal model too); each run in a fresh process, "
        f"{args.threads} torch thread(s), {alloc}. Floor (bare `import torch, rankfed`): peak {fl:,.1f} MiB. MiB = 2^20 bytes."
    )
    lines.append("")
    lines.append(
        "| model | setup | clients | client kind | sampled / round | distinct clients trained | RSS built (MiB) | peak RSS (MiB) | "
        "data (MiB) | model params | clients with state | state kept | state / client with state | "
        "round working set / sampled client | (peak - floor - data) / client | time (s) | |"
    )
    lines.append("|" + "---|" * 17)
    for r in results:
        head = f"| {r['model']} | {r['setup']} | {r['clients']:,} |"
        if "error" in r:
            lines.append(head + f" | | | | | | | | | | | | {r.get('wall_s', 0):.0f} | FAILED: {r['error']} |")
            continue
        data = r["dataset_bytes"] + r["client_data_bytes"]
        peak = peak_of(r)
        per_client = ((peak - fl) * MiB - data) / r["clients"]
        swc, pb = r["clients_with_state"], r["param_bytes"]
        state = fmt_bytes(r["state_bytes"])
        if r["state_storage_bytes"] != r["state_bytes"]:
            state += f" (storages {fmt_bytes(r['state_storage_bytes'])})"
        state_pc = f"{fmt_bytes(r['state_bytes'] / swc)} ({r['state_bytes'] / swc / pb:.2f} model)" if swc else "-"
        ws = working_set(r)
        lines.append(
            head
            + f" {r['client_kind']} | {r['clients_per_round']:,} | {r['participated']:,} | {r['rss_built_mib']:,.0f} | {peak:,.0f} | "
            f"{fmt_mib(data)} | {fmt_bytes(pb)} | {swc:,} | {state} | {state_pc} | {fmt_bytes(ws)} ({ws / pb:.1f} model) | "
            f"{fmt_bytes(per_client)} | {r['wall_s']:.0f} | {r['flag']} |"
        )
    lines.append("")
    lines.append(
        "Data: the dataset's train and test tensors (the experiment keeps them) plus the clients' own copies of their "
        "samples (`federate` gathers each client's tensors into new ones), so the training images are held twice. "
        "State: tensor bytes in `sim.client_states` (storages: the bytes of the distinct buffers behind them, shown only "
        "when they differ, which would mean a small view keeping a large buffer alive). Round working set: (peak of the "
        "rounds - RSS built - state) / clients sampled per round. `(peak - floor - data) / client` spreads every fixed "
        "cost (torch's first-use allocations, the models, the evaluation) over the clients; the table below separates "
        "what grows with them."
    )
    lines.append("")
    by: dict = {}
    for r in results:
        if "error" not in r:
            by.setdefault((r["model"], r["setup"]), []).append(r)
    rows = []
    for (model, setup), rs in by.items():
        if len(rs) < 2:
            continue
        rs.sort(key=lambda r: r["clients"])
        a, b = rs[0], rs[-1]
        dk = b["clients"] - a["clients"]
        pb = b["param_bytes"]
        d_peak = (peak_of(b) - peak_of(a)) * MiB
        d_built = (b["rss_built_mib"] - a["rss_built_mib"]) * MiB
        d_sc = b["clients_with_state"] - a["clients_with_state"]
        d_state = b["state_bytes"] - a["state_bytes"]
        d_cohort = b["clients_per_round"] - a["clients_per_round"]
        d_ws = (working_set(b) * b["clients_per_round"] - working_set(a) * a["clients_per_round"]) / max(d_cohort, 1)
        rows.append(
            f"| {model} | {setup} | {a['clients']:,} -> {b['clients']:,} | {d_peak / MiB:+,.0f} | {fmt_bytes(d_peak / dk)} ({d_peak / dk / pb:.2f} model) | "
            f"{fmt_bytes(d_built / dk)} | {fmt_bytes(d_state / d_sc) + f' ({d_state / d_sc / pb:.2f} model)' if d_sc else '-'} | "
            f"{fmt_bytes(d_ws)} ({d_ws / pb:.2f} model) | {fmt_bytes(pb)} | {marginal_flag(setup, d_peak / dk, d_ws, pb)} |"
        )
    if rows:
        lines.append("What grows with the clients (the larger run minus the smaller, per added client):")
        lines.append("")
        lines.append(
            "| model | setup | clients | peak RSS change (MiB) | peak, per added client | RSS built, per added client | "
            "state, per added client with state | round working set, per added sampled client | model params | |"
        )
        lines.append("|" + "---|" * 10)
        lines += rows
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", default="1000,10000", help="comma-separated client counts")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--participation", type=float, default=0.1)
    ap.add_argument("--setups", default=DEFAULT_SETUPS, help=f"for cnn2, from: {', '.join(SETUPS)}")
    ap.add_argument("--big-setups", default=BIG_DEFAULT_SETUPS, help="for the wide MLP ('' = skip it)")
    ap.add_argument("--mlp-hidden", default="512,512", help="hidden widths of the larger model (mlp)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads in each child")
    ap.add_argument("--timeout", type=float, default=300, help="seconds per child")
    ap.add_argument(
        "--mmap-threshold",
        type=int,
        default=0,
        help="> 0: set MALLOC_MMAP_THRESHOLD_ in the children (glibc then returns every large block to the OS when "
        "freed, so RSS shows live bytes, not the allocator's fragmentation); 0 = glibc's default (dynamic threshold)",
    )
    ap.add_argument("--out", default="", help="write the report here only (default: results/sim_memory.md and RESULTS.md)")
    ap.add_argument("--json", default="", help="also write the raw measurements here")
    ap.add_argument("--child", default="", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.child:
        spec = json.loads(args.child)
        res = child_floor() if spec.get("floor") else child_run(spec)
        print(json.dumps(res))
        return 0

    clients = [int(c) for c in args.clients.split(",") if c.strip()]
    plan = [("cnn2", s) for s in args.setups.split(",") if s.strip()]
    plan += [(f"mlp{args.mlp_hidden.replace(',', 'x')}", s) for s in args.big_setups.split(",") if s.strip()]
    for _, s in plan:
        if s not in SETUPS:
            ap.error(f"unknown setup {s!r}; choose from {', '.join(SETUPS)}")
    t_start = time.perf_counter()
    floor = run_child({"floor": True, "threads": args.threads}, args.timeout, args.mmap_threshold)
    if "error" in floor:
        print(f"floor measurement failed: {floor['error']}", file=sys.stderr)
        return 1
    print(f"floor: peak {floor['hwm_mib']:.1f} MiB, RSS {floor['rss_mib']:.1f} MiB", flush=True)
    results = []
    for model, setup in plan:
        for k in clients:
            ov = overrides_for("cnn2" if model == "cnn2" else "mlp", setup, k, args)
            r = run_child({"overrides": ov, "threads": args.threads}, args.timeout, args.mmap_threshold)
            r.update(model=model, setup=setup, clients=k)
            r["flag"] = flag_for(r)
            results.append(r)
            if "error" in r:
                print(f"{model:>12} {setup:>18} {k:>6}: FAILED {r['error']}", flush=True)
            else:
                print(
                    f"{model:>12} {setup:>18} {k:>6}: built {r['rss_built_mib']:7.0f} MiB, peak {max(r['hwm_build_mib'], r['hwm_train_mib']):7.0f} MiB, "
                    f"rounds' peak {r['hwm_train_mib']:7.0f} MiB, state {r['clients_with_state']:5d} clients {r['state_bytes'] / MiB:8.2f} MiB, "
                    f"{r['wall_s']:5.0f} s  {r['flag']}",
                    flush=True,
                )
    body = report(args, floor, results)
    title = f"Simulator memory at {' and '.join(f'{k:,}' for k in clients)} clients"
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        cmd = "python " + " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:])
        out.write_text(f"## {title}\n\nCommand: `{cmd}`\n\n{body}\n", encoding="utf-8")
    else:  # results/sim_memory.md and the sim_memory section of RESULTS.md
        out = write_result("sim_memory", title, body)
    if args.json:
        Path(args.json).write_text(json.dumps({"floor": floor, "results": results}, indent=1), encoding="utf-8")
    print(f"\n{body}\nwrote {out} ({time.perf_counter() - t_start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
