"""The ``rankfed`` command.

    rankfed run CONFIG.toml [--out DIR] [--set section.key=value ...]
    rankfed run --resume RUN_DIR
    rankfed compare CONFIG.toml --algorithms fedavg,... [--out DIR]
    rankfed compare --resume COMPARE_DIR
    rankfed compare --from RUN_DIR [RUN_DIR ...] [--out DIR]
    rankfed demo [--out DIR]
    rankfed plot DIR [DIR ...] [--out FILE.png]
    rankfed ddp CONFIG.toml --workers N --compressor greedylore [--rank R] [--warmup W] [--update-gap G]
    rankfed ddp --resume RUN_DIR [--steps N]
    rankfed flower run CONFIG.toml --supernodes N   (or --superlink HOST:PORT)
    rankfed flower run --resume RUN_DIR --supernodes N
    rankfed flower simulate CONFIG.toml --supernodes N --num-cpus C --num-gpus G [--ray-address HEAD:6379]
    rankfed flower app DIR
    rankfed analyze stable-rank RUN_DIR|CONFIG.toml --sizes 50,500
    rankfed analyze gradient-similarity RUN_DIR|CONFIG.toml --clients 10 --rank 4

Bad input (a config key, a missing data folder, an existing run folder) ends
with one line on stderr naming the problem and exit code 2, no traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import shlex
import signal
import sys
import warnings
from importlib import resources
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from rankfed.app.config import ExperimentConfig, is_import_path, load_config, parse_config
from rankfed.errors import ConfigError, DataFormatError, DataNotFoundError

__all__ = ["main"]

MB = 1e6
_USER_ERRORS = (ConfigError, DataNotFoundError, DataFormatError, FileExistsError, FileNotFoundError, ValueError)


def _stamp() -> str:
    return _dt.datetime.now().strftime("%Y%m%d-%H%M%S")


class _ProgressReporter:
    """A progress bar on a terminal; one plain line per evaluated round elsewhere (CI logs)."""

    def __init__(self, console: Console, total: int, label: str, quiet: bool = False):
        self.console, self.total, self.label, self.quiet = console, total, label, quiet
        self.progress: Progress | None = None
        self.acc: float | None = None
        self.loss: float | None = None

    def __enter__(self) -> _ProgressReporter:
        if not self.quiet and self.console.is_terminal:
            self.progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[status]}"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=self.console,
            )
            self.progress.start()
            self.task = self.progress.add_task(self.label, total=self.total, status="")
        return self

    def __exit__(self, *exc) -> None:
        if self.progress is not None:
            self.progress.stop()

    def __call__(self, rec) -> None:
        if rec.accuracy is not None:
            self.acc = rec.accuracy
        if rec.loss is not None:
            self.loss = rec.loss
        if self.acc is not None:
            acc = f"acc {100 * self.acc:5.1f}%"
        elif self.loss is not None:
            acc = f"loss {self.loss:8.4g}"
        else:
            acc = "acc   -  "
        status = f"{acc}  up {rec.cum_uplink_bytes / MB:9.3f} MB  down {rec.cum_downlink_bytes / MB:9.3f} MB"
        if self.progress is not None:
            self.progress.update(self.task, completed=rec.round, status=status)
        elif not self.quiet and getattr(rec, "evaluated", rec.accuracy is not None):
            self.console.print(f"{self.label} round {rec.round}/{self.total}  {status}", highlight=False)


def _command() -> str:
    return "rankfed " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def _run_one(cfg: ExperimentConfig, out: Path, console: Console, quiet: bool, overwrite: bool, label: str, dataset=None, resume: bool = False) -> dict:
    from rankfed.app.experiment import run_experiment

    with _ProgressReporter(console, cfg.federation.rounds, label, quiet) as report, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="training diverged")  # said below, once, as one line
        s = run_experiment(cfg, out, overwrite=overwrite, on_round=report, dataset=dataset, command=_command(), resume=resume)
    if s.get("status") == "diverged":
        console.print(f"rankfed: warning: {s['diverged']}; the run stopped there", highlight=False)
    return s


def comparison_table(rows: list[dict], title: str) -> Table:
    from rankfed.federation import COLUMNS, comparison_cells

    t = Table(title=title)
    for col in COLUMNS:
        t.add_column(col, justify="left" if col == "algorithm" else "right", no_wrap=True)
    for r in rows:
        t.add_row(*comparison_cells(r))
    return t


def _compare(cfg: ExperimentConfig, algorithms: list[str], out: Path, console: Console, quiet: bool, overwrite: bool, title: str, resume: bool = False) -> list[dict]:
    """Run (or, with ``resume``, continue) a comparison in ``out``: ``compare.json`` records the
    config, labels, title and command at the start, so ``rankfed compare --resume OUT`` needs
    nothing else; finished runs are kept, an interrupted one continues from its resume.pt."""
    from rankfed.app.config import to_toml
    from rankfed.app.experiment import load_task_data
    from rankfed.federation import open_compare_folder, read_summary, run_state

    variants = {label: cfg.with_algorithm(label) for label in algorithms}  # checks every label first
    open_compare_folder(out, algorithms, resume=resume, overwrite=overwrite, record={"title": title, "command": _command(), "config": to_toml(cfg)})
    dataset = None
    summaries = {}
    for label, v in variants.items():
        where = run_state(out / label) if resume else "new"
        if where == "done":
            summaries[label] = read_summary(out / label)
            if not quiet:
                console.print(f"{label}: finished before, kept ({out / label})", highlight=False)
            continue
        if dataset is None and not is_import_path(cfg.task.dataset):
            dataset = load_task_data(cfg)  # loaded once, shared by every run
        summaries[label] = _run_one(v, out / label, console, quiet, True, label, dataset, resume=where == "resumable")
    _show_comparison(out, [out / label for label in summaries], summaries, console, title)
    return list(summaries.values())


def _show_comparison(out: Path, runs: list[Path], summaries: dict, console: Console, title: str | None) -> None:
    from rankfed.federation import comparison_rows, write_comparison

    rows = comparison_rows(summaries)
    write_comparison(out, runs, rows, title)
    _print_comparison(rows, console, title, out)


def _print_comparison(rows: list[dict], console: Console, title: str | None, out: Path) -> None:
    from rankfed.federation import baseline_note

    console.print(comparison_table(rows, title or "comparison"))
    console.print(baseline_note(rows), highlight=False)
    console.print(f"comparison.md, comparison.json and comparison.png in {out}", highlight=False)


def _compare_command(args: argparse.Namespace, console: Console, err: Console, hint: list) -> None:
    """``rankfed compare``: a new comparison, ``--resume DIR`` or ``--from RUN_DIRS``."""
    import json

    from rankfed.app.config import tomllib
    from rankfed.federation import COMPARE_FILE, compare_runs

    if args.from_runs:
        if args.config or args.algorithms or args.resume or args.overrides:
            raise ConfigError("--from RUN_DIR ... tabulates finished runs: give no CONFIG, --algorithms, --set or --resume")
        out = Path(args.out or f"runs/compare-{_stamp()}")
        _print_comparison(compare_runs(args.from_runs, out, title=args.title), console, args.title, out)
        return
    if args.resume:
        if args.config or args.algorithms or args.overrides or args.out:
            raise ConfigError("--resume COMPARE_DIR continues that comparison as it was started: give no CONFIG, --algorithms, --set or --out")
        out = Path(args.resume)
        file = out / COMPARE_FILE
        if not file.is_file():
            raise FileNotFoundError(f"--resume {args.resume!r}: not a compare folder to resume (no {COMPARE_FILE}; made by an older rankfed, or not by compare)")
        saved = json.loads(file.read_text(encoding="utf-8"))
        cfg = parse_config(tomllib.loads(saved["config"]))
        hint[:] = [f"rankfed compare --resume {shlex.quote(str(out))}"]
        _compare(cfg, saved["labels"], out, console, args.quiet, False, saved.get("title") or "comparison", resume=True)
        return
    if args.config is None or not args.algorithms:
        raise ConfigError("rankfed compare: give an experiment file and --algorithms (or --resume COMPARE_DIR, or --from RUN_DIR ...)")
    cfg = _with_threads(load_config(args.config, args.overrides), args)
    out = Path(args.out or f"runs/compare-{_name(cfg.task.dataset)}-{_stamp()}")
    hint[:] = [f"rankfed compare --resume {shlex.quote(str(out))}"]
    _compare(cfg, _split_names(args.algorithms), out, console, args.quiet, args.overwrite, args.title or f"{cfg.task.dataset}: {args.algorithms}")


def _with_threads(cfg: ExperimentConfig, args: argparse.Namespace) -> ExperimentConfig:
    """``--threads N``: the config's ``federation.threads`` set to N."""
    if getattr(args, "threads", None) is None:
        return cfg
    return dataclasses.replace(cfg, federation=dataclasses.replace(cfg.federation, threads=args.threads))


def _split_names(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise ConfigError(f"--algorithms {text!r}: give at least one algorithm name")
    return names


def _demo_config() -> ExperimentConfig:
    from rankfed.app.config import tomllib

    text = resources.files("rankfed").joinpath("configs/demo.toml").read_text(encoding="utf-8")
    return parse_config(tomllib.loads(text))


def _int_list(flag: str, text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{flag} {text!r}: expected comma-separated integers") from None
    if not values:
        raise ConfigError(f"{flag} {text!r}: give at least one integer")
    return values


def _analyze(args: argparse.Namespace, console: Console, err: Console) -> None:
    from rankfed.app.analyze import analyze_gradient_similarity, analyze_stable_rank

    source = Path(args.source)
    if source.is_file():  # an experiment file: train it with checkpoints first
        cfg = load_config(source, args.overrides)
        if args.analysis == "stable-rank":  # a subset larger than the data would fail only after training
            from rankfed.app.experiment import load_task_data

            n = cfg.task.train_samples or len(load_task_data(cfg).train_y)
            too_big = [s for s in _int_list("--sizes", args.sizes) if s > n]
            if too_big:
                raise ConfigError(f"--sizes {args.sizes}: {too_big} exceed the {n} training samples")
        every = args.checkpoint_every or max(1, cfg.federation.rounds // 10)
        cfg = dataclasses.replace(cfg, federation=dataclasses.replace(cfg.federation, checkpoint_every=every))
        run_dir = Path(args.out or f"runs/analyze-{_name(cfg.task.dataset)}-{_stamp()}") / "run"
        _run_one(cfg, run_dir, err, args.quiet, args.overwrite, f"train {cfg.algorithm.name}")
        out = run_dir.parent
    elif source.is_dir():
        run_dir, out = source, Path(args.out) if args.out else source / "analysis"
    else:
        raise FileNotFoundError(f"{args.source!r}: no such run folder or experiment file")
    rounds = _int_list("--rounds", args.rounds) if args.rounds else None
    show = (lambda line: None) if args.quiet else (lambda line: err.print(line, highlight=False))  # noqa: E731
    if args.analysis == "stable-rank":
        sizes = _int_list("--sizes", args.sizes)
        rows = analyze_stable_rank(
            run_dir, sizes, subsets=args.subsets, probes=args.probes, lanczos_steps=args.lanczos_steps, rounds=rounds,
            seed=args.seed, confidence=args.confidence, out=out,
            on_result=lambda r: show(f"round {r['round']}  size {r['size']}  subset {r['subset']}: stable rank {r['stable_rank']:.2f} "
                                     f"[{r['ci_low']:.2f}, {r['ci_high']:.2f}], ||H||_2 {r['spectral_norm']:.4g}  ({r['seconds']:.1f} s)"),
        )  # fmt: skip
        console.print((out / "stable_rank.md").read_text(encoding="utf-8"), highlight=False, markup=False)
        console.print(f"{len(rows)} estimates; stable_rank.json, stable_rank.md and stable_rank.png in {out}", highlight=False)
    else:
        clients = int(args.clients) if args.clients.strip().isdigit() else _int_list("--clients", args.clients)
        rows = analyze_gradient_similarity(
            run_dir, clients=clients, rank=args.rank, rounds=rounds, seed=args.seed, out=out,
            on_result=lambda r: show(f"round {r['round']}: cosine full {r['full']:.3f}, rank {r['rank']} {r['low_rank']:.3f}"),
        )  # fmt: skip
        console.print((out / "gradient_similarity.md").read_text(encoding="utf-8"), highlight=False, markup=False)
        console.print(f"{len(rows)} checkpoints; gradient_similarity.json, .md and .png in {out}", highlight=False)


def _name(dataset: str) -> str:
    """A dataset's name as a folder name (an import path's last part)."""
    return dataset.rpartition(":")[2].rpartition(".")[2] or "data"


def _best(s: dict) -> str:
    if s["best_accuracy"] is not None:
        return f"accuracy {100 * s['best_accuracy']:.2f}% at round {s['best_round']}"
    if s.get("best_loss") is not None:
        return f"test loss {s['best_loss']:.4g} at round {s['best_round']}"
    return "accuracy -"


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _flower(args: argparse.Namespace, console: Console, err: Console) -> int:
    try:
        from rankfed.app.flower import run_flower, simulate_flower
        from rankfed.flower.deploy import FlowerRunError, write_app
    except ImportError as e:
        raise ConfigError(f"rankfed flower needs Flower: pip install 'rankfed[flower]' ({e})") from None
    if args.flower_command == "app":
        path = write_app(args.dir)
        console.print(f"wrote {path / 'pyproject.toml'}; submit with `rankfed flower run CONFIG --superlink HOST:PORT`", highlight=False)
        return 0
    resume = getattr(args, "resume", None)
    if resume:
        if args.config or args.overrides or args.out:
            raise ConfigError("--resume RUN_DIR continues that run as it was configured: give no CONFIG, --set or --out")
        if not (Path(resume) / "config.toml").is_file():
            raise FileNotFoundError(f"--resume {resume!r}: not a run folder (no config.toml)")
        cfg = load_config(Path(resume) / "config.toml")
    elif args.config is None:
        raise ConfigError(f"rankfed flower {args.flower_command}: give an experiment file" + (" (or --resume RUN_DIR)" if args.flower_command == "run" else ""))
    else:
        cfg = load_config(args.config, args.overrides)
    simulation = args.flower_command == "simulate"
    out = Path(resume or args.out or f"runs/flower-{'sim-' if simulation else ''}{_name(cfg.task.dataset)}-{cfg.algorithm.name}-{_stamp()}")
    if simulation:
        ray = f"the Ray cluster at {args.ray_address}" if args.ray_address else "Ray on this machine"
        where = f"Flower's simulation runtime ({args.supernodes} virtual SuperNodes; {ray}, {args.num_cpus:g} CPUs and {args.num_gpus:g} GPUs per worker)"
    else:
        where = f"SuperLink {args.superlink}" if args.superlink else f"a local deployment of {args.supernodes} SuperNodes"
    if not args.quiet:
        err.print(f"flower: {cfg.algorithm.name} on {where}; logs in {out / 'flower-logs'}", highlight=False)
    command = _command()
    # SIGTERM (a scheduler, `kill`) ends the run like Ctrl-C: every process it started is stopped.
    signal.signal(signal.SIGTERM, _interrupt)
    with _ProgressReporter(err, cfg.federation.rounds, f"flower {cfg.algorithm.name}", args.quiet) as report:
        on_metrics = lambda m: report(argparse.Namespace(**m))  # noqa: E731 - a metrics line reads like a RoundRecord
        try:
            if simulation:
                s = simulate_flower(
                    cfg, out, supernodes=args.supernodes, num_cpus=args.num_cpus, num_gpus=args.num_gpus, ray_address=args.ray_address,
                    overwrite=args.overwrite, command=command, on_metrics=on_metrics, timeout=args.timeout, data_dir=args.data_dir,
                )
            else:
                s = run_flower(
                    cfg, out, supernodes=args.supernodes, superlink=args.superlink, root_certificates=args.root_certificates, insecure=args.insecure,
                    overwrite=args.overwrite, command=command, on_metrics=on_metrics, timeout=args.timeout, data_dir=args.data_dir, resume=bool(resume),
                )
        except FlowerRunError as e:
            err.print(f"rankfed: error: {e}", highlight=False)
            return 1
    if s.get("status") == "failed":
        err.print(f"rankfed: error: the ServerApp failed: {s.get('error')}", highlight=False)
        return 1
    if s.get("status") == "diverged":
        err.print(f"rankfed: warning: {s['diverged']}; the run stopped there", highlight=False)
    sim = s.get("simulation") or {}
    on = f"Flower simulation ({s['supernodes']} virtual SuperNodes, {sim.get('ray_workers')} Ray workers)" if simulation else f"Flower ({s['supernodes']} SuperNodes)"
    console.print(
        f"{s['algorithm']} on {on}: best {_best(s)}; payload uplink {s['total_uplink_bytes'] / MB:.3f} MB "
        f"(Flower messages {s['total_flower_uplink_bytes'] / MB:.3f} MB), downlink {s['total_downlink_bytes'] / MB:.3f} MB "
        f"(Flower {s['total_flower_downlink_bytes'] / MB:.3f} MB); {s['failed_client_rounds']} failed client-rounds, "
        f"{len(s['skipped_rounds'])} skipped rounds; run folder {out}",
        highlight=False,
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rankfed", description="rankfed: federated and data-parallel training with low-rank updates, every byte counted.")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress output")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp: argparse.ArgumentParser, config: bool = True, optional_config: bool = False) -> None:
        if config:
            sp.add_argument("config", nargs="?" if optional_config else None, help="experiment file (TOML)")
            sp.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a config value (repeatable)")
        sp.add_argument("--out", help="output folder")
        sp.add_argument("--overwrite", action="store_true", help="replace an existing output folder")

    def threads(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--threads", type=int, metavar="N", help="torch threads for the run (federation.threads; default: the cores available to the process)")

    sp = sub.add_parser("run", help="run one experiment in the simulator")
    common(sp, optional_config=True)
    threads(sp)
    sp.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from its last saved state (no CONFIG)")
    sp = sub.add_parser("compare", help="run the same task with several algorithms and tabulate (or tabulate finished runs: --from)")
    common(sp, optional_config=True)
    threads(sp)
    sp.add_argument("--algorithms", help="comma-separated algorithm names or [algorithms.<label>] variants, e.g. fedavg,mapa")
    sp.add_argument("--resume", metavar="COMPARE_DIR", help="continue an interrupted comparison: finished runs kept, an interrupted one resumed (no CONFIG)")
    sp.add_argument("--from", dest="from_runs", nargs="+", metavar="RUN_DIR", help="rebuild the table and plot from finished run folders (or compare folders)")
    sp.add_argument("--title", help="the table's and plot's title")
    sp = sub.add_parser("demo", help="the embedded demo: six algorithms on digits, no download, under a minute on 2 cores")
    common(sp, config=False)
    threads(sp)
    _ddp_parser(sub, common)
    sp = sub.add_parser("flower", help="run on a Flower deployment (local SuperLink + SuperNodes, or a running federation)")
    fsub = sp.add_subparsers(dest="flower_command", required=True)
    fp = fsub.add_parser("run", help="run an experiment through Flower; writes the same run folder as `rankfed run`")
    common(fp, optional_config=True)
    fp.add_argument("--resume", metavar="RUN_DIR", help="continue a killed Flower run from its last saved state (no CONFIG)")
    fp.add_argument("--supernodes", type=int, default=2, help="local deployment: SuperNode processes (default 2); clients are spread over them")
    fp.add_argument("--superlink", metavar="HOST:PORT", help="submit to this running SuperLink instead of starting a local deployment")
    fp.add_argument("--root-certificates", metavar="CA.PEM", help="with --superlink: the CA certificate that signed the SuperLink's TLS certificate (default: the system's CAs)")
    fp.add_argument("--insecure", action="store_true", help="with --superlink: the SuperLink runs without TLS (flower-superlink --insecure)")
    fp.add_argument("--data-dir", help="local deployment: the dataset folder every SuperNode reads (node config data-dir)")
    fp.add_argument("--timeout", type=float, default=None, help="give up after this many seconds (default: no limit)")
    fp = fsub.add_parser("simulate", help="run an experiment on Flower's simulation runtime (virtual SuperNodes run by Ray workers); writes the same run folder")
    common(fp)
    fp.add_argument("--supernodes", type=int, default=2, help="virtual SuperNodes (default 2); clients are spread over them as over a deployment's")
    fp.add_argument("--num-cpus", type=float, default=1, help="CPUs per Ray worker (default 1); the workers are as many as the Ray cluster's CPUs hold")
    fp.add_argument("--num-gpus", type=float, default=0.0, help="GPUs per Ray worker (default 0; 0.5 puts two workers on each GPU)")
    fp.add_argument("--ray-address", metavar="ADDRESS", help="a running Ray cluster (`ray start --head` prints HEAD:6379) instead of starting Ray here")
    fp.add_argument("--data-dir", help="the dataset folder the ServerApp and every Ray worker read (task.data_dir)")
    fp.add_argument("--timeout", type=float, default=None, help="give up after this many seconds (default: no limit)")
    fp = fsub.add_parser("app", help="write the Flower App (pyproject.toml) that runs rankfed experiments, for `flwr run`")
    fp.add_argument("dir", help="folder to write")
    sp = sub.add_parser("analyze", help="rank analysis along a run's checkpoints: Hessian stable rank, gradient similarity")
    asub = sp.add_subparsers(dest="analysis", required=True)
    for name, helptext in (
        ("stable-rank", "stable rank ||H||_F^2/||H||_2^2 of the loss Hessian on random training subsets of each size"),
        ("gradient-similarity", "mean pairwise cosine similarity of clients' gradients, full vs rank-r"),
    ):
        ap = asub.add_parser(name, help=helptext)
        ap.add_argument("source", help="a run folder with checkpoints, or an experiment file to train first")
        ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE", help="with an experiment file: override a config value")
        ap.add_argument("--checkpoint-every", type=int, default=0, help="with an experiment file: checkpoint every n rounds (default: rounds / 10)")
        ap.add_argument("--rounds", help="checkpoints to analyse, e.g. 0,50,100 (default: all)")
        ap.add_argument("--seed", type=int, default=0, help="seed of the subsets / client choice and the probes")
        ap.add_argument("--out", help="output folder (default: RUN_DIR/analysis)")
        ap.add_argument("--overwrite", action="store_true", help="with an experiment file: replace an existing training run folder")
        if name == "stable-rank":
            ap.add_argument("--sizes", default="50,500", help="subset sizes, comma-separated (default 50,500)")
            ap.add_argument("--subsets", type=int, default=3, help="random subsets per size (default 3)")
            ap.add_argument("--probes", type=int, default=100, help="Hutchinson probes for ||H||_F^2 (default 100)")
            ap.add_argument("--lanczos-steps", type=int, default=30, help="Lanczos iterations for ||H||_2 (default 30)")
            ap.add_argument("--confidence", type=float, default=0.95, help="confidence level of the interval (default 0.95)")
        else:
            ap.add_argument("--clients", default="10", help="how many clients (a seeded choice), or ids like 0,3,7 (default 10)")
            ap.add_argument("--rank", type=int, default=4, help="rank of the approximations (default 4)")
    sp = sub.add_parser("plot", help="plot run folders: accuracy vs round and vs cumulative bytes")
    sp.add_argument("runs", nargs="+", help="run folders, or a compare folder")
    sp.add_argument("--out", help="PNG file (default: plot.png in the first folder)")
    sp.add_argument("--bytes", choices=("total", "uplink", "downlink"), default="total", help="which bytes on the x axis")
    sp.add_argument("--title")
    _quiet_everywhere(p)
    return p


def _quiet_everywhere(parser: argparse.ArgumentParser) -> None:
    """``-q`` after any subcommand too (``rankfed run -q X``), not only before it."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                sub.add_argument("--quiet", "-q", action="store_true", default=argparse.SUPPRESS, help="no progress output")
                _quiet_everywhere(sub)


# rankfed ddp's flags, by DdpOptions field; None = not given (DdpOptions' default, or the resumed run's)
_DDP_FLAGS = ("workers", "compressor", "rank", "update_gap", "warmup", "steps", "eval_every", "backend", "probes", "dense_patterns", "dense_head", "diagnostics_every", "checkpoint_every")
_DDP_RESUME_FLAGS = ("steps", "checkpoint_every")  # what a resumed run may change


def _ddp_parser(sub, common) -> None:
    from rankfed.ddp.runner import DDP_COMPRESSORS, DdpOptions

    d = DdpOptions()
    sp = sub.add_parser(
        "ddp",
        help="data-parallel training on N worker processes with a gradient compressor",
        description=(
            "Data-parallel training of the experiment's task and model on N worker processes; the [client] table gives the "
            "optimiser (sgd, with momentum, or adamw), lr and batch size per worker. The defaults follow GreedyLore's experiments "
            "in order of magnitude (dense warm-ups of 500-4000 steps, a subspace refresh every 200-1200 steps, ranks 8-64); "
            "embeddings and the output head are all-reduced dense, as the authors' code does."
        ),
    )
    common(sp, optional_config=True)
    sp.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted ddp run from its last resume point (no CONFIG; only --steps and --checkpoint-every may change)")
    sp.add_argument("--workers", type=int, help=f"worker processes (default {d.workers})")
    sp.add_argument("--compressor", help=f"{' | '.join(DDP_COMPRESSORS)} (default {d.compressor})")
    sp.add_argument("--rank", type=int, help=f"low-rank compressors: rank of each compressed matrix (default {d.rank}; the paper: 8-64)")
    sp.add_argument("--update-gap", type=int, help=f"greedylore: steps between subspace refreshes (default {d.update_gap}; the paper: 200-1200)")
    sp.add_argument("--warmup", type=int, help=f"dense all-reduce for the first n steps, every compressor (default {d.warmup}; the paper: 500-4000)")
    sp.add_argument("--probes", type=int, help=f"greedylore: Gaussian probes per direction for the scores (default {d.probes}, the paper's; more is not in the paper)")
    sp.add_argument(
        "--dense-patterns", metavar="PATTERNS",
        help="comma-separated fnmatch patterns of parameter names all-reduced dense (default '*embed*,*wte*,*wpe*,*lm_head*'; '' for none)",
    )  # fmt: skip
    sp.add_argument("--dense-head", action=argparse.BooleanOptionalAction, help="all-reduce the output head (the last nn.Linear) dense (default: yes)")
    sp.add_argument("--steps", type=int, help=f"training steps (default {d.steps})")
    sp.add_argument("--eval-every", type=int, help=f"evaluate every n steps (default {d.eval_every})")
    sp.add_argument("--diagnostics-every", type=int, help="write captured_fraction / residual_ratio to metrics.jsonl every n steps (default 1 with powersgd, greedylore, random; 0 = off)")
    sp.add_argument("--checkpoint-every", type=int, help="write a resume point every n steps (default: every --eval-every steps; 0 = never; torch-powersgd: never)")
    sp.add_argument("--backend", help="gloo (CPU, default) | nccl (one GPU per worker)")


def _ddp(args, console: Console, err: Console) -> int:
    from rankfed.app.ddp import resume_options, run_ddp_config
    from rankfed.ddp.runner import DdpOptions

    given = {k: getattr(args, k) for k in _DDP_FLAGS if getattr(args, k) is not None}
    if "dense_patterns" in given:
        given["dense_patterns"] = [p.strip() for p in given["dense_patterns"].split(",") if p.strip()]
    if args.resume:
        if args.config or args.overrides or args.out or args.overwrite:
            raise ConfigError("--resume RUN_DIR continues that run as it was configured: give no CONFIG, --set, --out or --overwrite")
        other = [k for k in given if k not in _DDP_RESUME_FLAGS]
        if other:
            raise ConfigError(f"--resume RUN_DIR continues that run with its own options: only --steps and --checkpoint-every may be given, not {', '.join('--' + k.replace('_', '-') for k in other)}")
        out = Path(args.resume)
        if not (out / "config.toml").is_file():
            raise FileNotFoundError(f"--resume {args.resume!r}: not a run folder (no config.toml)")
        cfg, saved = resume_options(out)
        opts = dataclasses.replace(saved, **given)
    elif args.config is None:
        raise ConfigError("rankfed ddp: give an experiment file (or --resume RUN_DIR)")
    else:
        cfg = load_config(args.config, args.overrides)
        opts = DdpOptions(**given)
        out = Path(args.out or f"runs/ddp-{_name(cfg.task.dataset)}-{opts.compressor}-{_stamp()}")
    if not args.quiet:
        err.print(f"ddp: {opts.workers} workers ({opts.backend}), {opts.compressor}, {opts.steps} steps" + (f", resumed in {out}" if args.resume else ""), highlight=False)
    s = run_ddp_config(cfg, opts, out, overwrite=args.overwrite, command=_command(), resume=bool(args.resume))
    if s["status"] == "diverged":
        err.print(f"rankfed: warning: training diverged at step {s['diverged_at_step']} (non-finite weights or gradients; try a lower lr); the run stopped there", highlight=False)
        console.print(f"ddp-{opts.compressor}: diverged at step {s['diverged_at_step']}; run folder {out}", highlight=False)
        return 0
    console.print(
        f"ddp-{opts.compressor}: final accuracy {100 * s['final_accuracy']:.2f}% after {s['steps']} steps; "
        f"{s['mean_bytes_per_step'] / 1e3:.1f} kB per step per worker ({100 * s['bytes_vs_dense']:.1f}% of dense); "
        f"{1e3 * sum(s['mean_step_s_per_worker']) / len(s['mean_step_s_per_worker']):.1f} ms per step; run folder {out}",
        highlight=False,
    )
    return 0


def _format_warning(message, category, filename, lineno, line=None) -> str:
    """rankfed's own warnings (UserWarning) as one line, like its errors; others as Python prints them."""
    if category is UserWarning and "rankfed" in str(filename):
        return f"rankfed: warning: {message}\n"
    return _python_format_warning(message, category, filename, lineno, line)


_python_format_warning = warnings.formatwarning


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    warnings.formatwarning = _format_warning
    # Off a terminal (logs, CI, pipes) rich would squeeze tables into 80 columns.
    console = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 200)
    err = Console(stderr=True, soft_wrap=True, width=None if sys.stderr.isatty() else 160)
    hint: list[str] = []  # the command that continues what an interrupt stops
    try:
        if args.command == "run":
            if args.resume:
                if args.config or args.overrides or args.out or args.threads is not None:
                    raise ConfigError("--resume RUN_DIR continues that run as it was configured: give no CONFIG, --set, --out or --threads")
                out = Path(args.resume)
                if not (out / "config.toml").is_file():
                    raise FileNotFoundError(f"--resume {args.resume!r}: not a run folder (no config.toml)")
                text = (out / "config.toml").read_text(encoding="utf-8")
                if text.startswith("# written by rankfed.Federation"):
                    raise ConfigError(f"--resume {args.resume!r}: this run was started from Python (rankfed.Federation); resume it from your script with Federation.run(..., out={str(out)!r}, resume=True)")
                _check_resumable(out)
                cfg = load_config(out / "config.toml")
            elif args.config is None:
                raise ConfigError("rankfed run: give an experiment file (or --resume RUN_DIR)")
            else:
                cfg = _with_threads(load_config(args.config, args.overrides), args)
                out = Path(args.out or f"runs/{_name(cfg.task.dataset)}-{cfg.algorithm.name}-{_stamp()}")
            hint[:] = [f"rankfed run --resume {shlex.quote(str(out))}"]
            s = _run_one(cfg, out, err, args.quiet, args.overwrite, cfg.algorithm.name, resume=bool(args.resume))
            console.print(
                f"{s['algorithm']}: best {_best(s)}; uplink {s['total_uplink_bytes'] / MB:.3f} MB, "
                f"downlink {s['total_downlink_bytes'] / MB:.3f} MB; run folder {out}",
                highlight=False,
            )
        elif args.command == "compare":
            _compare_command(args, console, err, hint)
        elif args.command == "ddp":
            return _ddp(args, console, err)
        elif args.command == "analyze":
            _analyze(args, console, err)
        elif args.command == "flower":
            return _flower(args, console, err)
        elif args.command == "demo":
            import time

            t0 = time.perf_counter()
            cfg = _with_threads(_demo_config(), args)
            out = Path(args.out or f"runs/demo-{_stamp()}")
            hint[:] = [f"rankfed compare --resume {shlex.quote(str(out))}"]
            names = list(cfg.algorithms) or [cfg.algorithm.name]
            _compare(cfg, names, out, console, args.quiet, args.overwrite, "rankfed demo: digits, 20 clients, Dirichlet(0.5)")
            threads = cfg.federation.threads or _cores()
            console.print(f"demo took {time.perf_counter() - t0:.1f} s on {threads} thread{'s' if threads != 1 else ''} (--threads N to change)", highlight=False)
        elif args.command == "plot":
            from rankfed.plot import find_runs, plot_runs

            runs = find_runs(args.runs)
            out = Path(args.out) if args.out else Path(args.runs[0]) / "plot.png"
            plot_runs(runs, out, bytes_kind=args.bytes, title=args.title)
            console.print(f"wrote {out} ({len(runs)} runs)", highlight=False)
    except _USER_ERRORS as e:
        print(f"rankfed: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        then = f"; continue it with: {hint[0]}" if hint else ""
        print(f"rankfed: interrupted; the run folder keeps the rounds finished so far{then}", file=sys.stderr)
        return 130
    return 0


def _cores() -> int:
    from rankfed.federation import resolve_threads

    return resolve_threads(None)


def _check_resumable(out: Path) -> None:
    """``rankfed run --resume``: a completed run, or one killed before its first resume point,
    is a clear error (the second with the command that starts it again)."""
    from rankfed.federation import run_state

    where = run_state(out)
    if where == "done":
        raise ConfigError(f"--resume {str(out)!r}: the run is complete (summary.json written); there is nothing to resume")
    if where != "resumable":
        raise ConfigError(
            f"--resume {str(out)!r}: the run stopped before its first resume point (federation.resume_every rounds), so there is nothing to resume from; "
            f"start it again with: rankfed run {shlex.quote(str(out / 'config.toml'))} --out {shlex.quote(str(out))} --overwrite"
        )


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
