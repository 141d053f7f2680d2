"""The `launcher` command. Exit codes: 0 ok, 1 the job failed, 2 bad input."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from launcher import __version__
from launcher.errors import UserError

EXIT_OK, EXIT_JOB_FAILED, EXIT_BAD_INPUT = 0, 1, 2


def _job_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="recipe YAML file")
    p.add_argument("--cluster", required=True, help="a profile name in clusters/ or a path to one")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted recipe keys to override, e.g. megatron.expert_model_parallel_size=8")


def _layout_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--layout", choices=["best"],
                   help="best: the top row of `launcher plan --search` (its overrides go after yours)")


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="launcher", description="Plan, render and submit megatron-core MoE SFT jobs.")
    top.add_argument("--version", action="version", version=f"moe-launcher {__version__}")
    sub = top.add_subparsers(dest="command", required=True)

    p = sub.add_parser("validate", help="exit 0 when the job can run, 2 when it cannot")
    _job_args(p)
    p = sub.add_parser("plan", help="parallel layout and memory per GPU; --search: every layout that fits, ranked")
    _job_args(p)
    p.add_argument("--json", action="store_true", help="print one JSON object (with --search: a list, best first)")
    p.add_argument("--search", action="store_true",
                   help="rank every layout megatron-core accepts on the recipe's GPUs by estimated speed")
    p.add_argument("--top", type=int, default=10, help="rows to show with --search (default 10; 0: all)")
    p = sub.add_parser("render", help="write the job spec(s)")
    _job_args(p)
    _layout_arg(p)
    p.add_argument("-o", "--output", type=Path, help="folder to write into; without it the spec goes to stdout")
    p = sub.add_parser("submit", help="submit the job")
    _job_args(p)
    p.add_argument("--dry-run", action="store_true", help="render and print what would be submitted")
    p.add_argument("--restart", action="store_true", help="start the run over: its checkpoints and metrics are "
                   "renamed to NAME.before-TIME first (local and Slurm)")
    _layout_arg(p)
    how = p.add_mutually_exclusive_group()
    how.add_argument("--wait", action="store_true", help="block until the job ends; exit 1 if it failed")
    how.add_argument("--follow", action="store_true", help="stream the job's log until it ends")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p = sub.add_parser("status", help="state, progress, checkpoint, alerts, exit code, nodes and times of a job")
    p.add_argument("job_id")
    p.add_argument("--json", action="store_true")
    p.add_argument("--watch", nargs="?", type=float, const=5.0, metavar="SECONDS",
                   help="refresh in place every SECONDS (default 5) until the job ends")
    p = sub.add_parser("list", help="recent jobs with their state and progress, newest first")
    p.add_argument("-n", type=int, default=20, help="how many (default 20)")
    p.add_argument("--state", help="only jobs in this state (running, completed, failed, pending, ...)")
    p.add_argument("--name", help="only jobs whose name contains this")
    p.add_argument("--json", action="store_true", help="print a JSON list")
    p = sub.add_parser("logs", help="a job's output")
    p.add_argument("job_id")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing new output until the job ends")
    sub.add_parser("convert", add_help=False,
                   help="Hugging Face <-> megatron-core checkpoints (launcher convert -h)")
    p = sub.add_parser("cancel", help="stop a job")
    p.add_argument("job_id")
    p = sub.add_parser("report", help="plots and a summary of a run's metrics (RUN_DIR or a job id)")
    p.add_argument("target", help="a run directory (all its jobs) or a job id (that job's steps)")
    p.add_argument("-o", "--output", type=Path, help="folder to write into (default RUN_DIR/report)")
    p = sub.add_parser("data", help="look at the recipe's data as the trainer will see it")
    data = p.add_subparsers(dest="data_command", required=True)
    p = data.add_parser("check", help="rows, tokens, learned tokens, bad rows, packing, rendered samples")
    p.add_argument("recipe", help="recipe YAML file")
    p.add_argument("--rows", type=int, default=1000, help="how many rows to read, in file order (default 1000)")
    p.add_argument("--cluster", help="read the paths as this cluster's job sees them (through its container mounts)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted recipe keys to override")
    return top


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    if argv[:1] == ["convert"]:
        return cmd_convert(argv[1:])
    top = parser()
    # key=value overrides may come before or after options; argparse leaves the late ones over.
    args, extra = top.parse_known_args(argv)
    unknown = [a for a in extra if a.startswith("-") or "=" not in a or not hasattr(args, "recipe")]
    if unknown:
        top.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.overrides = [*getattr(args, "overrides", []), *extra]
    try:
        return COMMANDS[args.command](args)
    except UserError as err:
        for problem in err.problems:
            print(f"error: {problem}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        return 130


def _prepare(args, require_ok=True):
    from launcher.job import prepare_job
    from launcher.schema import parse_override

    for text in args.overrides:  # reject malformed overrides before reading any file
        parse_override(text)
    if getattr(args, "layout", None) == "best":
        *_, result = _search(args)
        if not result.candidates:
            raise UserError(f"{args.recipe}: --layout best: no layout fits; run `launcher plan {args.recipe} "
                            f"--cluster {args.cluster} --search` to see what would")
        args.overrides = [*args.overrides, *result.candidates[0].overrides]
        print(f"layout: {' '.join(result.candidates[0].overrides)}", file=sys.stderr)
    return prepare_job(args.recipe, args.cluster, args.overrides, require_ok=require_ok)


def _search(args):
    """(cluster, recipe, model, the search's result) for the recipe as overridden."""
    from launcher.cluster import load_cluster
    from launcher.plan.models import read_model
    from launcher.plan.search import search_layouts
    from launcher.recipe import load_recipe
    from launcher.schema import parse_override

    for text in args.overrides:
        parse_override(text)
    cluster = load_cluster(args.cluster)
    recipe = load_recipe(args.recipe, args.overrides)
    model = read_model(recipe.model.path, args.recipe)
    return cluster, recipe, model, search_layouts(recipe, cluster, model)


def cmd_validate(args) -> int:
    job = _prepare(args)
    lay, mem = job.plan.layout, job.plan.memory
    print(f"ok: {job.recipe_source} on {job.cluster.name}: {lay.world_size} "
          f"{'processes' if job.cluster.on_cpu else 'GPUs'}, TP{lay.tp} PP{lay.pp} EP{lay.ep} ETP{lay.etp} "
          f"CP{lay.cp} DP{lay.dp} EDP{lay.edp}, {mem.total:.1f} of {mem.capacity:.1f} GiB")
    for warning in lay.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    return EXIT_OK


def cmd_plan(args) -> int:
    if args.search:
        return cmd_search(args)
    job = _prepare(args, require_ok=False)
    if args.json:
        print(json.dumps(job.plan.to_dict(), sort_keys=False))
    else:
        print(plan_text(job))
    return EXIT_OK


def cmd_search(args) -> int:
    from launcher.plan.search import fewest_nodes

    cluster, recipe, model, result = _search(args)
    rows = result.candidates[:args.top] if args.top > 0 else result.candidates
    if args.json:
        print(json.dumps([c.to_dict() for c in rows]))
    else:
        print(search_text(args, cluster, recipe, result, rows))
    if result.candidates:
        return EXIT_OK
    units = "processes" if cluster.on_cpu else "GPUs"
    max_nodes = cluster.max_nodes or max(1, 1024 // max(cluster.gpus_per_node, 1))
    found = None if cluster.backend == "local" else fewest_nodes(recipe, cluster, model, max_nodes)
    if found:
        nodes, candidate = found
        raise UserError(f"{args.recipe}: no layout fits {recipe.world_size} {units} of {cluster.gpu_memory_gib:g} GiB "
                        f"even with every memory option; the fewest that fit: trainer.nnodes={nodes} "
                        f"({nodes * cluster.gpus_per_node} GPUs), for example with "
                        f"{' '.join(candidate.overrides)}")
    where = ("on this machine" if cluster.backend == "local"
             else f"nor on up to {max_nodes} nodes of cluster '{cluster.name}'")
    raise UserError(f"{args.recipe}: no layout fits {recipe.world_size} {units} of {cluster.gpu_memory_gib:g} GiB even "
                    f"with every memory option, {where}; use GPUs with more memory or a shorter data.max_length")


SHORT_OPTION_NAMES = {"megatron.grad_reduce_in_fp32=false": "bf16 grads",
                      "model.enable_gradient_checkpointing=true": "recompute",
                      "megatron.optimizer_offload=true": "optimizer offload"}


def search_text(args, cluster, recipe, result, rows) -> str:
    from launcher.plan.speed import hardware

    hw = hardware(cluster)
    lines = [f"recipe      {args.recipe} on cluster {cluster.name}: {recipe.world_size} x "
             f"{cluster.gpu_type or 'GPU'} of {cluster.gpu_memory_gib:g} GiB; speed estimated for {hw.name} "
             f"{'with transformer-engine ' if hw.transformer_engine else ''}at {hw.mfu:.0%} of "
             f"{hw.peak_tflops:g} TFLOP/s (README: how the search estimates speed)",
             f"searched    {result.valid_layouts} layouts megatron-core accepts (with micro-batch sizes); "
             f"{len(result.candidates)} fit",
             ""]
    if rows:
        lines.append(f"{'#':>3} {'tokens/s/GPU':>12} {'GiB':>6}  {'bottleneck':<12} {'TP':>2} {'PP':>3} {'VPP':>3} "
                     f"{'EP':>3} {'ETP':>3} {'CP':>2} {'MB':>2}  memory options")
    for i, c in enumerate(rows, 1):
        lay = c.layout
        options = ", ".join(SHORT_OPTION_NAMES[o] for o in c.options) or "-"
        lines.append(f"{i:>3} {c.speed.tokens_per_s_per_gpu:>12,.0f} {c.memory.total:>6.1f}  {c.speed.bottleneck:<12} "
                     f"{lay.tp:>2} {lay.pp:>3} {lay.vpp:>3} {lay.ep:>3} {lay.etp:>3} {lay.cp:>2} "
                     f"{c.micro_batch_size:>2}  {options}")
    if rows:
        lines += ["", f"best        launcher submit {args.recipe} --cluster {args.cluster} --layout best",
                  f"            or these overrides: {' '.join(rows[0].overrides)}"]
    return "\n".join(lines)


def plan_text(job) -> str:
    plan, lay, mem, model = job.plan, job.plan.layout, job.plan.memory, job.plan.model
    cluster = job.cluster
    unit = "process" if cluster.on_cpu else "GPU"
    hardware = f"{cluster.gpu_type or 'GPUs'}" if not cluster.on_cpu else "CPU processes"
    lines = [
        f"recipe      {job.recipe_source} on cluster {cluster.name} "
        f"({job.nnodes} node{'s' if job.nnodes > 1 else ''} x {job.nproc_per_node} {hardware})",
        f"model       {model.family}: {model.total_params() / 1e9:.2f}B parameters, "
        f"{model.active_params() / 1e9:.2f}B active; {model.num_layers} layers, "
        f"{model.num_experts} experts, top-{model.topk}",
        f"attention   world {lay.world_size} = TP {lay.tp} x CP {lay.cp} x DP {lay.dp} x PP {lay.pp}",
        f"experts     world {lay.world_size} = ETP {lay.etp} x EP {lay.ep} x EDP {lay.edp} x PP {lay.pp}"
        f"  ({model.num_experts // lay.ep} experts per {unit})",
        f"pipeline    layers per stage {' '.join(map(str, lay.stage_layers))}; "
        f"{lay.num_microbatches} micro-batches per step; sequence parallel {'on' if lay.sequence_parallel else 'off'}",
        f"memory      per {unit}, stage {mem.stage}: params {mem.params:.1f} + grads {mem.grads:.1f} + "
        f"optimizer {mem.optimizer:.1f} + activations {mem.activations:.1f} + overhead {mem.overhead:.1f} "
        f"= {mem.total:.1f} GiB of {mem.capacity:.1f}: {'fits' if mem.fits else 'DOES NOT FIT'}",
    ]
    if mem.optimizer_on_host:
        lines.append(f"            optimizer states in host memory: {mem.optimizer_on_host:.1f} GiB per {unit}")
    if job.recipe.notes:
        lines.append(f"notes       {job.recipe.notes}")
    lines += [f"warning     {w}" for w in lay.warnings]
    lines += [f"problem     {p}" for p in plan.problems]
    return "\n".join(lines)


def _render(job) -> dict[str, str]:
    from launcher.backends import backend_for

    return backend_for(job.cluster).render(job)


def _stdout_text(files: dict[str, str]) -> str:
    """What `render` prints without -o: the spec(s) to run; the recipe is already inside them."""
    specs = [text for name, text in files.items() if name != "recipe.yaml"]
    return "---\n".join(specs)


def cmd_render(args) -> int:
    job = _prepare(args)
    files = _render(job)
    if args.output is None:
        sys.stdout.write(_stdout_text(files))
        return EXIT_OK
    from launcher.backends.base import write_files

    for path in write_files(files, args.output):
        print(path)
    return EXIT_OK


def cmd_submit(args) -> int:
    job = _prepare(args)
    files = _render(job)
    if args.dry_run:
        main_file = next(name for name in files if name != "recipe.yaml")
        how = {"slurm": f"sbatch {main_file}", "kubernetes": "kubectl apply -f configmap.yaml -f pytorchjob.yaml",
               "local": f"bash {main_file}"}[job.cluster.backend]
        print(f"# dry run: would run `{how}` for job {job.name}; run directory {job.run_dir}")
        sys.stdout.write(_stdout_text(files))
        return EXIT_OK
    from launcher.backends import backend_for
    from launcher.resume import refusal
    from launcher.store import JobStore

    checkpoints = Path(job.recipe.trainer.default_local_dir).expanduser()
    if args.restart:
        if job.cluster.backend == "kubernetes":
            raise UserError(f"{job.recipe_source}: --restart: the run directory is on the cluster's volume, out of "
                            "this machine's reach; set another job.name to start a new run")
        from datetime import datetime

        from launcher.resume import set_aside

        for moved in set_aside(Path(job.run_dir), checkpoints, datetime.now().strftime("%Y%m%d-%H%M%S")):
            print(f"restart: moved aside {moved}", file=sys.stderr)
    refused = refusal(checkpoints, job.recipe.to_dict())
    if refused:  # checked again by the trainer where this machine cannot see the run directory
        raise UserError(f"{job.recipe_source}: {refused}")
    unset = [n for n in job.recipe.job.secrets if n not in os.environ]
    if unset and job.cluster.backend != "kubernetes":  # (Kubernetes jobs read them from Secrets)
        raise UserError(f"{job.recipe_source}: job.secrets: {', '.join(unset)} not set in this environment; the job "
                        f"takes {'them' if len(unset) > 1 else 'it'} from here: export {unset[0]}=... before "
                        "`launcher submit`")
    backend = backend_for(job.cluster)
    store = JobStore()
    record = backend.submit(job, files)  # raises UserError, recording nothing, when it fails
    store.add(record)
    if not args.json:
        print(f"submitted job {record.job_id} ({job.name}) to {job.cluster.name}; run directory {job.run_dir}",
              flush=True)
    if not (args.wait or args.follow):
        if args.json:
            print(json.dumps({"job_id": record.job_id, "run_dir": record.run_dir}))
        return EXIT_OK
    if args.follow:
        for chunk in backend.logs(record, follow=True):
            sys.stdout.write(chunk)
            sys.stdout.flush()
    status = wait_for(backend, record)
    return finish(backend, record, status, args.json)


def wait_for(backend, record, poll_s: float = 2.0):
    import time

    while True:
        status = backend.status(record)
        if status.finished:
            return status
        time.sleep(poll_s)


def finish(backend, record, status, as_json: bool) -> int:
    ok = status.state == "COMPLETED"
    if as_json:
        print(json.dumps({"job_id": record.job_id, "run_dir": record.run_dir, "state": status.state,
                          "exit_code": status.exit_code}))
    else:
        print(f"job {record.job_id} {status.state} (exit code {status.exit_code})")
        if ok:
            checkpoints = _checkpoint_dir(record)
            print(_loss_summary(Path(record.run_dir) / "metrics.jsonl", record.job_id))
            print(f"metrics: {Path(record.run_dir) / 'metrics.jsonl'}")
            if checkpoints:
                print(f"checkpoint: {checkpoints}")
        else:
            log = "".join(backend.logs(record))
            # torchrun's failure report ends the log; the trainer's own error lines say why
            errors = list(dict.fromkeys(line for line in log.splitlines() if line.startswith("error: ")))
            for line in errors[:5]:
                print(f"the job said: {line}")
            print("--- last lines of the log ---")
            print("\n".join(log.splitlines()[-30:]))
    return EXIT_OK if ok else EXIT_JOB_FAILED


def _loss_summary(path: Path, job_id: str) -> str:
    """'loss 6.27 -> 1.23 over 60 steps; validation loss 2.53 -> 1.28' from this job's records
    of metrics.jsonl (the run directory keeps earlier submissions' records too)."""
    try:
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (OSError, json.JSONDecodeError):
        records = []
    records = [r for r in records if r.get("job_id") == job_id]
    train = [r for r in records if "loss" in r]
    val = [r for r in records if "val_loss" in r]
    if not train:
        return "this job trained no steps (see its log)"
    steps = f"{len(train)} steps" if train[0]["step"] == 1 else \
        f"{len(train)} steps ({train[0]['step']} to {train[-1]['step']})"
    text = f"loss {train[0]['loss']:.3f} -> {train[-1]['loss']:.3f} over {steps}"
    if val:
        text += f"; validation loss {val[0]['val_loss']:.3f} -> {val[-1]['val_loss']:.3f}"
    return text


def _checkpoint_dir(record) -> str | None:
    import yaml

    try:
        recipe = yaml.safe_load((Path(record.run_dir) / "recipe.yaml").read_text())
        root = Path(recipe["trainer"]["default_local_dir"])
        latest = (root / "latest").read_text().strip()
        return str(root / latest)
    except (OSError, KeyError, TypeError, yaml.YAMLError):
        return None


def _backend_for_record(job_id: str):
    from launcher.backends import backend_for
    from launcher.cluster import load_cluster
    from launcher.store import JobStore

    record = JobStore().get(job_id)
    return backend_for(load_cluster(record.cluster)), record


def cmd_status(args) -> int:
    import time

    backend, record = _backend_for_record(args.job_id)
    while True:
        status = backend.status(record)
        progress = _progress(backend, record, status)
        if args.json:
            print(json.dumps({"job_id": record.job_id, "name": record.name, "state": status.state,
                              "exit_code": status.exit_code, "nodes": status.nodes, "start": status.start,
                              "end": status.end, "reason": status.reason, "run_dir": record.run_dir,
                              "log": backend.log_path(record), **progress.to_dict()}), flush=True)
        else:
            text = status_text(backend, record, status, progress)
            print(("\x1b[H\x1b[2J" if args.watch and sys.stdout.isatty() else "") + text, flush=True)
        if not args.watch or status.finished:
            return EXIT_OK
        time.sleep(args.watch)


def status_text(backend, record, status, progress) -> str:
    from launcher.progress import duration

    steps = f"{progress.step}/{progress.total_steps}" if progress.step is not None else "-"
    lines = [
        f"job          {record.job_id} ({record.name}, {record.backend})",
        f"state        {status.state}" + (f" ({status.reason})" if status.reason else ""),
        f"step         {steps}" + (f", loss {progress.loss:.4f}" if progress.loss is not None else "")
        + (f", validation loss {progress.val_loss:.4f}" if progress.val_loss is not None else ""),
        f"speed        {f'{progress.tokens_per_s:,.0f} tokens/s' if progress.tokens_per_s else '-'}; "
        f"elapsed {duration(progress.elapsed_s)}, ETA {duration(progress.eta_s)}",
        f"restarts     {progress.restarts}",
    ]
    if progress.alerts:
        lines.append(f"alerts       {len(progress.alerts)}, the last: {progress.alerts[-1]}")
    lines.append(f"checkpoint   {progress.last_checkpoint or '-'}")
    if progress.last_error:
        lines.append(f"error        {progress.last_error}")
    if progress.rank_failure:
        lines.append(f"failed rank  {progress.rank_failure}")
    lines += [f"exit code    {status.exit_code if status.exit_code is not None else '-'}",
              f"nodes        {status.nodes or '-'}",
              f"start, end   {status.start or '-'}, {status.end or '-'}",
              f"run dir      {record.run_dir}",
              f"log          {backend.log_path(record) or '-'}"]
    return "\n".join(lines)


def _progress(backend, record, status):
    from launcher.progress import read_progress

    log = backend.log_path(record)
    return read_progress(record.run_dir, record.job_id, log if log and "://" not in log else None,
                         running=not status.finished)


def cmd_list(args) -> int:
    from launcher.backends import backend_for
    from launcher.cluster import load_cluster
    from launcher.progress import duration
    from launcher.store import JobStore

    rows = []
    for record in JobStore().recent(args.n if not (args.state or args.name) else 10**6):
        if args.name and args.name not in record.name:
            continue
        try:
            backend = backend_for(load_cluster(record.cluster))
            status = backend.status(record)
        except UserError:
            continue  # a profile that moved or a cluster out of reach: `launcher status` says which
        if args.state and status.state.lower() != args.state.lower():
            continue
        rows.append((record, status, _progress(backend, record, status)))
        if len(rows) >= args.n:
            break
    if args.json:
        print(json.dumps([{"job_id": r.job_id, "name": r.name, "backend": r.backend, "state": s.state,
                           "submitted_at": r.submitted_at, "run_dir": r.run_dir, **p.to_dict()} for r, s, p in rows]))
        return EXIT_OK
    print(f"{'JOB':<22} {'NAME':<20} {'STATE':<10} {'STEP':>11} {'LOSS':>8} {'TOK/S':>9} {'ELAPSED':>8} {'ETA':>8}")
    for r, s, p in rows:
        step = f"{p.step}/{p.total_steps}" if p.step is not None else "-"
        loss = f"{p.loss:.4f}" if p.loss is not None else "-"
        speed = f"{p.tokens_per_s:,.0f}" if p.tokens_per_s else "-"
        print(f"{r.job_id:<22} {r.name[:20]:<20} {s.state:<10} {step:>11} {loss:>8} {speed:>9} "
              f"{duration(p.elapsed_s):>8} {duration(p.eta_s):>8}")
    return EXIT_OK


def cmd_logs(args) -> int:
    backend, record = _backend_for_record(args.job_id)
    for chunk in backend.logs(record, follow=args.follow):
        sys.stdout.write(chunk)
        sys.stdout.flush()
    return EXIT_OK


def cmd_cancel(args) -> int:
    backend, record = _backend_for_record(args.job_id)
    backend.cancel(record)
    print(f"cancelled job {record.job_id}")
    return EXIT_OK


def cmd_report(args) -> int:
    from launcher import report

    target, job_id = Path(args.target), None
    if not target.is_dir():
        from launcher.store import JobStore

        record = JobStore().get(args.target)  # UserError: neither a folder nor a known job
        target, job_id = Path(record.run_dir), record.job_id
    metrics = target / "metrics.jsonl"
    if not metrics.exists():
        raise UserError(f"{metrics}: no metrics yet; the job writes them from its first step")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UserError("launcher report needs matplotlib: pip install 'moe-launcher[report]'") from None
    run = report.Run.read(metrics, job_id)
    if not run.steps:
        raise UserError(f"{metrics}: no training steps{f' of job {job_id}' if job_id else ''} yet")
    thresholds = {}
    if (target / "recipe.yaml").exists():  # the run's own alert thresholds
        from launcher.recipe import load_recipe

        trainer = load_recipe(target / "recipe.yaml").trainer
        thresholds = {"spike": trainer.alert_loss_spike, "imbalance_limit": trainer.alert_expert_imbalance}
    found = report.alerts(run, **thresholds)
    out = args.output or target / "report"
    for path in report.write(run, out, f"{target.name}" + (f" ({job_id})" if job_id else ""), found):
        print(path)
    for alert in found:
        print(f"alert: {alert}", file=sys.stderr)
    return EXIT_OK


def cmd_data(args) -> int:
    """`launcher data check`: exit 2 when the job would stop at a bad row."""
    from launcher import data_check
    from launcher.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    if args.cluster:
        from launcher.cluster import load_cluster

        recipe = data_check.as_seen_on(recipe, load_cluster(args.cluster))
    try:
        from trainer.data.parquet import DataError

        report = data_check.check(recipe, args.rows)
    except (DataError, ValueError, OSError) as err:
        raise UserError(str(err)) from None
    if args.json:
        print(json.dumps(report.to_dict()))
    else:
        print(data_check.text(report, args.recipe, recipe.data.skip_bad_rows, recipe.data.truncation))
    if report.usable == 0:
        print(f"error: {', '.join(recipe.data.train_files)}: no usable rows to train on "
              f"({report.rows_read} read); the job would stop before its first step", file=sys.stderr)
        return EXIT_BAD_INPUT
    return EXIT_BAD_INPUT if report.bad and not recipe.data.skip_bad_rows else EXIT_OK


COMMANDS = {"validate": cmd_validate, "plan": cmd_plan, "render": cmd_render, "submit": cmd_submit,
            "status": cmd_status, "list": cmd_list, "logs": cmd_logs, "cancel": cmd_cancel, "data": cmd_data,
            "report": cmd_report}


def cmd_convert(rest: list[str]) -> int:
    """`python -m trainer.convert` (torch and megatron-core load there, never in the launcher);
    with --nproc N, N local processes that each convert a share (for more nodes, run that
    module under torchrun)."""
    import os
    import socket
    import subprocess

    nproc = 1
    if "--nproc" in rest:
        at = rest.index("--nproc")
        value = rest[at + 1] if at + 1 < len(rest) else ""
        if not value.isdigit() or int(value) < 1:
            print(f"error: --nproc {value!r}: expected a whole number of processes, e.g. --nproc 4", file=sys.stderr)
            return EXIT_BAD_INPUT
        nproc, rest = int(value), rest[:at] + rest[at + 2:]
    command = [sys.executable, "-m", "trainer.convert", *rest]
    if nproc == 1:
        return subprocess.run(command).returncode
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen(command, env={**os.environ, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(nproc),
                                            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
             for r in range(nproc)]
    codes = [p.wait() for p in procs]
    return max(codes)
