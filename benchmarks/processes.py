"""Multi-process scaling row of the speed benchmark: the training step in 1 process vs N data-parallel processes.

Usage (from the repository root, with the package installed)::

    python benchmarks/processes.py --model smollm2            # 1 vs 2 processes, each method of METHODS
    python benchmarks/processes.py --model tiny --steps 4     # a quick look

Every method trains the same global batch (``--batch`` rows x ``--seq`` tokens, the speed benchmark's training
batch) for ``--steps`` timed steps after ``--warmup`` untimed ones:

- 1 process: the whole batch, with every CPU thread (``--threads``, default: all cores);
- N processes: ``torchrun --nproc_per_node N``, DistributedDataParallel over gloo, each rank ``batch / N`` rows
  and ``threads / N`` threads, so both runs use the same cores. The ranks start each step together (a barrier)
  and the step time is the slowest rank's.

The table gives tokens/s (global batch tokens / median step time) and the speedup of N processes over 1. On a
CPU machine the processes share the cores that one process would use with more threads, so this measures what DDP
costs and gains on the same hardware (gradient all-reduce, smaller per-rank matrices), not what N GPUs would give;
the README labels it so. Results: ``benchmarks/results/speed_<model>_processes.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

METHODS = ("v2", "ipt", "peft_prefix", "lora")
from harness import RESULTS, markdown_table, write_outputs  # noqa: E402


def worker(args) -> None:
    """One rank (or the single process): time the training step and write the per-step times (rank 0)."""
    from speed import MODELS, Setting, build_runner, make_batch, train_step

    distributed = "RANK" in os.environ
    rank, world = 0, 1
    if distributed:
        dist.init_process_group("gloo", timeout=timedelta(seconds=300))
        rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(max(1, args.threads // world))
    spec = MODELS[args.model]
    setting = Setting(torch.device("cpu"), "fp32")
    runner = build_runner(args.method, spec, args.prefix_length, setting.device, trained=True)
    if runner.error:
        raise SystemExit(f"{args.method}: {runner.error}")
    if distributed:
        runner.model = torch.nn.parallel.DistributedDataParallel(runner.model)
    share = args.batch // world
    batch = make_batch(spec, args.batch, args.seq, setting.device)
    batch = {k: v[rank * share : (rank + 1) * share] for k, v in batch.items()}
    times = []
    for step in range(args.warmup + args.steps):
        if distributed:
            dist.barrier()
        start = time.perf_counter()
        train_step(runner, batch, setting)
        elapsed = torch.tensor(time.perf_counter() - start)
        if distributed:
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # the step ends when the slowest rank ends
        if step >= args.warmup:
            times.append(elapsed.item())
    if rank == 0:
        Path(args.out).write_text(
            json.dumps({"step_s": times, "threads_per_process": torch.get_num_threads()})
        )
    if distributed:
        dist.barrier()
        dist.destroy_process_group()


def launch(args, method: str, processes: int, out: Path) -> dict:
    common = ["--worker", "--model", args.model, "--method", method, "--out", str(out)]
    common += ["--batch", str(args.batch), "--seq", str(args.seq), "--steps", str(args.steps)]
    common += ["--warmup", str(args.warmup), "--threads", str(args.threads)]
    common += ["--prefix-length", str(args.prefix_length)]
    script = str(Path(__file__).resolve())
    if processes == 1:
        command = [sys.executable, script, *common]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes)]
        command += ["--master_addr", "127.0.0.1", "--master_port", str(29500 + os.getpid() % 1000)]
        command += [script, *common]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, args.threads // processes))}
    if "lo" in {name for _, name in socket.if_nameindex()}:
        env.setdefault(
            "GLOO_SOCKET_IFNAME", "lo"
        )  # both ranks on loopback, whatever the hostname resolves to
    print(f"[processes] {method}: {processes} process(es)", file=sys.stderr, flush=True)
    subprocess.run(command, check=True, env=env)
    return json.loads(out.read_text())


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2", choices=["tiny", "smollm2", "minilm"])
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--prefix-length", type=int, default=16)
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return
    if args.batch % args.processes:
        raise SystemExit(f"--batch {args.batch} must divide evenly over --processes {args.processes}")
    from speed import LABELS

    tokens = args.batch * args.seq
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods:
            runs = {n: launch(args, method, n, Path(tmp) / f"{method}_{n}.json") for n in (1, args.processes)}
            single, multi = (statistics.median(runs[n]["step_s"]) for n in (1, args.processes))
            rows.append(
                {
                    "method": method,
                    "label": LABELS.get(method, method),
                    "step_s": {"1": single, str(args.processes): multi},
                    "tokens_per_s": {"1": tokens / single, str(args.processes): tokens / multi},
                    "speedup": single / multi,
                    "raw_step_s": {str(n): runs[n]["step_s"] for n in runs},
                }
            )
    n = args.processes
    markdown = (
        f"# Training step: 1 process vs {n} DDP processes ({args.model}, CPU, {args.threads} threads in all)\n\n"
        f"Global batch {args.batch} x {args.seq} tokens, P={args.prefix_length}; median of {args.steps} steps "
        f"after {args.warmup} warm-up. 1 process uses {args.threads} threads; each of the {n} gloo ranks "
        f"{max(1, args.threads // n)}, on the same cores.\n\n"
    )
    markdown += markdown_table(
        ["method", "tokens/s, 1 process", f"tokens/s, {n} processes", "speedup"],
        [
            [
                r["label"],
                f"{r['tokens_per_s']['1']:.0f}",
                f"{r['tokens_per_s'][str(n)]:.0f}",
                f"{r['speedup']:.2f}x",
            ]
            for r in rows
        ],
    )
    settings = {k: v for k, v in vars(args).items() if k not in ("worker", "method", "out", "out_dir")}
    document = {"settings": settings, "cores": os.cpu_count(), "torch": torch.__version__, "rows": rows}
    write_outputs(f"speed_{args.model}_processes", document, markdown, args.out_dir)


if __name__ == "__main__":
    main()
