"""FP8 expert GEMMs against fp32 on the quickstart's real corpus (issue 15; method: bench/README.md,
"FP8 experts").

Trains the same model, data, seed and schedule once in fp32 and once per FP8 recipe (hybrid format:
E4M3 forward, E5M2 gradients), each as ``torchrun`` with the quickstart's flags (openmoe-tiny,
expert parallelism over the ranks), and compares the mean lm_loss of the last ``--window`` iterations
with fp32's. Issue 15's targets: blockwise within 0.5%, delayed and tensorwise within 1%.

The model is openmoe-tiny widened to hidden 128 / ffn 256 for EVERY run (blockwise needs both
divisible by 128; one shared config keeps the comparison fair). The corpus is built exactly as
examples/quickstart.sh builds it (Python stdlib -> SentencePiece 2048 -> .bin/.idx) unless
``--data-dir`` already holds it.

    PYTHONPATH=. python bench/fp8_convergence.py [--iters 600] [--nproc 2] \
        [--json bench/results/fp8_convergence.json]
    PYTHONPATH=. python bench/fp8_convergence.py --report-only   # re-read finished metrics files

On CPU the FP8 GEMMs are emulated (quantise, dequantise, fp32 GEMM), so FP8 runs take LONGER than
fp32 here; only their losses mean anything.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGETS = {"fp32": None, "delayed": 0.01, "tensorwise": 0.01, "blockwise": 0.005}  # issue 15


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", default="fp32,delayed,tensorwise,blockwise",
                   help="comma-separated: fp32 and/or FP8 recipes")
    p.add_argument("--format", default="hybrid", choices=("e4m3", "hybrid"))
    p.add_argument("--iters", type=int, default=600)
    p.add_argument("--window", type=int, default=50, help="final iterations averaged")
    p.add_argument("--nproc", type=int, default=2, help="ranks per run (torchrun)")
    p.add_argument("--parallel", type=int, default=1,
                   help="runs trained at once (on few cores: more of the machine's share, same work)")
    p.add_argument("--ep", type=int, default=None, help="expert parallel size (default: --nproc)")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--ffn", type=int, default=256)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--vocab", type=int, default=2048, help="tokenizer vocabulary (quickstart's)")
    p.add_argument("--data-dir", default="runs/fp8_convergence/data")
    p.add_argument("--out-dir", default="runs/fp8_convergence", help="metrics and logs of each run")
    p.add_argument("--json", default="bench/results/fp8_convergence.json", metavar="PATH")
    p.add_argument("--report-only", action="store_true", help="skip training, read the metrics files")
    return p.parse_args(argv)


def run(cmd: list[str]) -> None:
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)


def train_all(args: argparse.Namespace, names: list[str]) -> None:
    """Every run, ``--parallel`` at a time; each run's wall seconds go to OUT/NAME.wall (so that
    --report-only, or runs started by separate invocations, can still report them)."""
    out_dir = Path(args.out_dir)
    pending, active = list(names), []
    while pending or active:
        while pending and len(active) < args.parallel:
            name = pending.pop(0)
            metrics = out_dir / f"{name}.metrics.jsonl"
            metrics.unlink(missing_ok=True)  # the trainer appends: start every run from an empty file
            cmd = train_command(args, name, metrics)
            print("$", " ".join(cmd), flush=True)
            log = open(out_dir / f"{name}.log", "w")
            proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
            active.append((name, proc, log, time.perf_counter()))
        time.sleep(2)
        for item in list(active):
            name, proc, log, start = item
            if proc.poll() is None:
                continue
            log.close()
            active.remove(item)
            if proc.returncode:
                raise SystemExit(f"{name} failed (exit {proc.returncode}); see {log.name}")
            wall = time.perf_counter() - start
            (out_dir / f"{name}.wall").write_text(f"{wall:.1f}\n")
            print(f"== {name}: {wall:.0f} s", flush=True)


def build_corpus(data: Path, vocab: int) -> None:
    """examples/quickstart.sh's three data steps, same arguments; skipped when the corpus is there."""
    if (data / "stdlib_text_document.idx").exists():
        return
    data.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    run([py, "tools/make_corpus.py", "--source", "python-stdlib", "--output", str(data / "corpus.jsonl"),
         "--max-bytes", "4000000"])
    run([py, "tools/train_tokenizer.py", "--input", str(data / "corpus.jsonl"), "--json-keys", "text",
         "--vocab-size", str(vocab), "--model-prefix", str(data / "tokenizer"), "--overwrite"])
    run([py, "tools/preprocess_data.py", "--input", str(data / "corpus.jsonl"), "--json-keys", "text",
         "--output-prefix", str(data / "stdlib"), "--tokenizer-type", "SentencePieceTokenizer",
         "--tokenizer-model", str(data / "tokenizer.model"), "--workers", "2", "--append-eod"])


def train_command(args: argparse.Namespace, name: str, metrics: Path) -> list[str]:
    """The quickstart's pretraining command (no checkpoints, no tensorboard) at the shared width."""
    data = Path(args.data_dir)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
           str(args.nproc), "pretrain_openmoe.py",
           "--model-preset", "openmoe-tiny",
           "--data-path", str(data / "stdlib_text_document"),
           "--tokenizer-model", str(data / "tokenizer.model"), "--split", "98,2,0",
           "--expert-model-parallel-size", str(args.ep or args.nproc),
           # 4 heads x 32 = hidden 128 (the preset's 4 x 16 matches its hidden 64)
           "--hidden-size", str(args.hidden), "--ffn-hidden-size", str(args.ffn),
           "--kv-channels", str(args.hidden // 4),
           "--seq-length", "128", "--micro-batch-size", "4", "--global-batch-size", "16",
           "--train-iters", str(args.iters), "--lr", "2e-3", "--min-lr", "2e-4",
           "--lr-warmup-iters", "20", "--lr-decay-style", "cosine", "--weight-decay", "0.01",
           "--clip-grad", "1.0", "--log-interval", "50", "--eval-interval", "200", "--eval-iters", "5",
           "--seed", str(args.seed), "--metrics-file", str(metrics)]
    if name != "fp32":
        cmd += ["--fp8-format", args.format, "--fp8-recipe", name]
    return cmd


def read_metrics(path: Path) -> tuple[list[dict], dict[int, float]]:
    """The training iterations' records (the last one per iteration, should a run have appended),
    and the validation lm loss by iteration."""
    rows: dict[int, dict] = {}
    evals: dict[int, float] = {}
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a killed run
        if "lm_loss" in record and "iteration" in record:
            rows[record["iteration"]] = record
        elif "eval_lm_loss" in record:
            evals[record["iteration"]] = record["eval_lm_loss"]
    return [rows[i] for i in sorted(rows)], evals


def summarise(args: argparse.Namespace, names: list[str], walls: dict[str, float]) -> dict:
    out_dir = Path(args.out_dir)
    results, window_losses = {}, {}
    for name in names:
        rows, evals = read_metrics(out_dir / f"{name}.metrics.jsonl")
        if len(rows) < args.iters:
            raise SystemExit(f"{name}: {len(rows)} of {args.iters} iterations in its metrics file")
        window = rows[-args.window:]
        window_losses[name] = [r["lm_loss"] for r in window]
        results[name] = {
            "final_window_lm_loss": sum(r["lm_loss"] for r in window) / len(window),
            "first_lm_loss": rows[0]["lm_loss"],
            "eval_lm_loss": {str(i): v for i, v in sorted(evals.items())},
            "skipped_steps": sum(bool(r.get("skipped")) for r in rows),
            "median_step_s": sorted(r["step_time"] for r in rows)[len(rows) // 2],
            "wall_s": walls.get(name),
        }
    base = results.get("fp32", {}).get("final_window_lm_loss")
    for name, r in results.items():
        if base is not None and name != "fp32":
            r["rel_diff_vs_fp32"] = (r["final_window_lm_loss"] - base) / base
            # both runs see the same batches: the per-iteration paired difference cancels batch noise;
            # its standard error says whether the gap is between trajectories or within batch noise
            paired = [(a - b) / b for a, b in zip(window_losses[name], window_losses["fp32"])]
            r["paired_rel_se"] = statistics.stdev(paired) / len(paired) ** 0.5
            r["target"] = TARGETS[name]
            if r["target"] is not None:
                r["within_target"] = abs(r["rel_diff_vs_fp32"]) <= r["target"]
    return {
        "config": {k: getattr(args, k) for k in ("format", "iters", "window", "nproc", "ep", "hidden",
                                                  "ffn", "seed", "vocab", "data_dir")},
        "command_fp32": " ".join(train_command(args, "fp32", Path("M.jsonl"))[2:]),
        "results": results,
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    names = args.runs.split(",")
    bad = [n for n in names if n not in TARGETS]
    if bad:
        raise SystemExit(f"unknown runs {bad}; choose from {list(TARGETS)}")
    if "blockwise" in names and (args.hidden % 128 or args.ffn % 128):
        raise SystemExit("blockwise needs --hidden and --ffn divisible by 128 (one config for every run)")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ["PYTHONPATH"] = str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if not args.report_only:
        build_corpus(Path(args.data_dir), args.vocab)
        train_all(args, names)
    walls = {n: float((out_dir / f"{n}.wall").read_text()) for n in names if (out_dir / f"{n}.wall").exists()}
    summary = summarise(args, names, walls)

    print(f"\n| run | final {args.window}-iter lm loss | vs fp32 (paired SE) | target | ok "
          f"| eval lm loss @{args.iters} | median step s | wall s |")
    print("|---|---:|---:|---:|---|---:|---:|---:|")
    for name, r in summary["results"].items():
        label = name if name == "fp32" else f"{args.format} {name}"
        rel, target = r.get("rel_diff_vs_fp32"), r.get("target")
        rel_s = "" if rel is None else f"{100 * rel:+.2f}% ({100 * r['paired_rel_se']:.2f}%)"
        target_s = "" if target is None else f"{100 * target:.1f}%"
        ok = "" if target is None else ("yes" if r["within_target"] else "NO")
        final_eval = r["eval_lm_loss"].get(str(args.iters))
        eval_s = "" if final_eval is None else f"{final_eval:.4f}"
        wall_s = "" if r["wall_s"] is None else f"{r['wall_s']:.0f}"
        print(f"| {label} | {r['final_window_lm_loss']:.4f} | {rel_s} | {target_s} | {ok} | {eval_s} | "
              f"{r['median_step_s']:.3f} | {wall_s} |")
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(summary, indent=1) + "\n")
        os.replace(tmp, path)  # never a half-written results file under the final name
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
