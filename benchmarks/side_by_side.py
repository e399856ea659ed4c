"""marl-ray against its peers on the reference workload (benchmarks/README.md), side by side.

Runs in the project venv and launches every measurement as its own process. --workload ppo (default):
  marl-ray:           .venv/bin/python benchmarks/ppo_step.py ...
  trl-multi-adapter:  .venv-trl/bin/python benchmarks/trl_peer.py --impl trl-multi-adapter ...
  three-model:        .venv-trl/bin/python benchmarks/trl_peer.py --impl three-model ...
(.venv-trl comes from benchmarks/setup_trl_venv.sh). --workload grpo (the GRPO workload: 16 prompts
x G=4 = 64 completions per step, "samples" below are completions):
  marl-ray:           .venv/bin/python benchmarks/grpo_step.py ...
  trl-grpo:           .venv/bin/python benchmarks/trl_grpo_peer.py --gradient-checkpointing on ...
  trl-grpo-nogc:      .venv/bin/python benchmarks/trl_grpo_peer.py --gradient-checkpointing off ...
(TRL 1.16's GRPOTrainer, in the project venv itself; gradient checkpointing on is its default).
For each configuration (size, dtype, quant, policies) the implementations alternate, A B C A B C ..., for --repeats rounds, all with the same
torch thread count, so a slow spell of a shared machine falls on all of them alike.
--lockstep goes further (policies 1): a round's processes start together and take turns
iteration by iteration (benchmarks/turns.py), so each marl-ray iteration runs right next to each
peer's; the summary then also pairs them iteration by iteration.

Ratios are marl-ray / peer per round, then the median and the min-max over the rounds:
  samples/s ratio    = marl samples_per_s / peer samples_per_s       (> 1: marl-ray is faster)
  model memory ratio = marl model_rss_mib / peer model_rss_mib       (< 1: marl-ray is leaner)
model_rss_mib is the peak resident memory above the process's memory right after its imports.

--policies N > 1: marl-ray trains N policies in one job (N x 16 samples, or N x 64 completions,
per iteration). A TRL
policy is its own job, so a peer "run" is N separate peer processes, run one after another (the
machine has 2 cores; running them at once would only make each slower), and counted as if they
shared the machine: memory = the sum of the N jobs' model_rss_mib (and of their peak_rss_mib);
time per sample = the N jobs' total median iteration time / their N x 16 samples (x 64 completions).

    python benchmarks/side_by_side.py --sizes medium --dtypes fp32,bf16 --repeats 3
    python benchmarks/side_by_side.py --sizes large --policies 4 --peers trl-multi-adapter --repeats 2
    python benchmarks/side_by_side.py --workload grpo --sizes small --dtypes fp32 --repeats 2 --iters 4 --lockstep
    python benchmarks/side_by_side.py --workload grpo --sizes smollm2 --dtypes fp32,bf16 --repeats 2 --lockstep

--sizes smollm2 (grpo): the real SmolLM2-135M-Instruct (49k vocabulary) for both systems, with LoRA on
every linear layer of both (--lora-targets auto).

Raw results go to benchmarks/results/<timestamp>.json (and a .md with the table); plot them with
benchmarks/plot_results.py.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import GRPO, REAL_BASES, ROOT, build_base, build_workload, grpo_prompts, spread  # noqa: E402

PEERS = ("trl-multi-adapter", "three-model")
GRPO_PEERS = ("trl-grpo", "trl-grpo-nogc")
# per workload: marl-ray's script, the peers, the peers' script, what a "sample" is
WORKLOADS = {
    "ppo": {"marl": "ppo_step.py", "peers": PEERS, "peer_script": "trl_peer.py", "unit": "samples"},
    "grpo": {"marl": "grpo_step.py", "peers": GRPO_PEERS, "peer_script": "trl_grpo_peer.py", "unit": "completions"},
}


def prepare_workload(work: Path, sizes, n_prompts: int, workload: str = "ppo", steps: dict | None = None):
    """Build what each size needs once: base/reward adapter/prompts (harness.build_workload) for ppo;
    the base and the GRPO prompts (harness.build_base, harness.grpo_prompts; steps[size] steps of 16) for grpo."""
    for size in sizes:
        if workload == "grpo":
            grpo_prompts(work, build_base(work, size), GRPO["prompts_per_step"] * steps[size])
        else:
            build_workload(work, size, n_prompts=n_prompts)


def peer_command(workload: str, peer: str, cfg: list[str], seed: int, out_json: Path, trl_python: str,
                 marl_python: str) -> list[str]:
    """The command line of one peer job."""
    if workload == "grpo":
        gc = "off" if peer.endswith("-nogc") else "on"
        return [marl_python, "benchmarks/trl_grpo_peer.py", "--gradient-checkpointing", gc, *cfg, "--seed", str(seed),
                "--json", str(out_json)]
    return [trl_python, "benchmarks/trl_peer.py", "--impl", peer, *cfg, "--seed", str(seed), "--json", str(out_json)]


def run_one(cmd, log: Path, out_json: Path, env, timeout):
    t0 = time.perf_counter()
    with open(log, "w") as f:
        f.write(" ".join(cmd) + "\n\n")
        f.flush()
        try:
            rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    return _result(rc, log, out_json, time.perf_counter() - t0)


def run_lockstep(jobs, env, turns_dir: Path, timeout):
    """Run the (cmd, log, json) jobs at once, taking turns iteration by iteration (benchmarks/turns.py):
    their model loads overlap, their iterations do not."""
    t0 = time.perf_counter()
    procs, files = [], []
    for k, (cmd, log, _) in enumerate(jobs):
        f = open(log, "w")  # noqa: SIM115  (closed below, after the process ends)
        cmd = [*cmd, "--turns", f"{turns_dir}:{k}:{len(jobs)}"]
        f.write(" ".join(cmd) + "\n\n")
        f.flush()
        files.append(f)
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT))
    out = []
    for p, f, (_, log, js) in zip(procs, files, jobs):
        try:
            rc = p.wait(timeout=max(1.0, timeout - (time.perf_counter() - t0)))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
            rc = "timeout"
        f.close()
        out.append(_result(rc, log, js, time.perf_counter() - t0))
    return out


def _result(rc, log: Path, out_json: Path, wall: float) -> dict:
    if rc == 0 and out_json.exists():
        res = json.loads(out_json.read_text())
        res["wall_s"] = wall
        return res
    tail = log.read_text().splitlines()[-15:]
    return {"error": f"rc={rc}", "log": str(log), "tail": tail, "wall_s": wall}


def aggregate_jobs(jobs, policies):
    """N single-policy peer jobs counted as one N-policy workload on the same machine."""
    bad = [j for j in jobs if "error" in j]
    if bad:
        return {"error": bad[0]["error"], "log": bad[0].get("log"), "tail": bad[0].get("tail"), "jobs": jobs}
    total_step = sum(j["step_s_median"] for j in jobs)
    first = jobs[0]
    per_job = first.get("completions_per_step", 16)  # samples of one job's iteration
    return {
        "impl": first["impl"], "size": first["size"], "quant": first["quant"], "dtype": first["dtype"],
        "policies": policies, "jobs": len(jobs), "aggregate": "sequential separate jobs, summed",
        "torch_threads": first["torch_threads"], "params": first["params"],
        "step_s_median": total_step,
        "gen_s_median": sum(j["gen_s_median"] for j in jobs),
        "score_s_median": sum(j["score_s_median"] for j in jobs),
        "train_s_median": sum(j["train_s_median"] for j in jobs),
        "samples_per_s": per_job * len(jobs) / total_step,
        "peak_rss_mib": sum(j["peak_rss_mib"] for j in jobs),
        "baseline_rss_mib": sum(j["baseline_rss_mib"] for j in jobs),
        "model_rss_mib": sum(j["model_rss_mib"] for j in jobs),
        "shims": first.get("shims", []),
        "job_results": jobs,
    }


def summarize(cfg_result):
    runs = cfg_result["runs"]
    marl = runs["marl-ray"]
    out = {}
    for peer in cfg_result["peers"]:
        pr = runs[peer]
        sps, mem, peak, per_iter = [], [], [], []
        phases = {"gen": [], "score": [], "train": []}
        for a, b in zip(marl, pr):
            if "error" in a or "error" in b:
                continue
            sps.append(a["samples_per_s"] / b["samples_per_s"])
            if cfg_result.get("lockstep"):  # iteration i of both ran back to back
                per_iter += [tb / ta for ta, tb in zip(a["step_s_all"], b["step_s_all"])]
            mem.append(a["model_rss_mib"] / b["model_rss_mib"] if b["model_rss_mib"] > 0 else None)
            peak.append(a["peak_rss_mib"] / b["peak_rss_mib"])
            for ph in phases:  # marl-ray's time / the peer's, per phase
                if a.get(f"{ph}_s_median") and b.get(f"{ph}_s_median"):
                    phases[ph].append(a[f"{ph}_s_median"] / b[f"{ph}_s_median"])
        out[peer] = {
            "pairs": len(sps),
            "samples_per_s_ratio": spread(sps),
            "samples_per_s_ratio_by_iteration": spread(per_iter),
            "model_rss_ratio": spread(mem),
            "peak_rss_ratio": spread(peak),
            "phase_time_ratio": {ph: spread(v, 3) for ph, v in phases.items()},  # marl / peer seconds (< 1: faster)
            "marl_samples_per_s": spread([r["samples_per_s"] for r in marl if "error" not in r]),
            "peer_samples_per_s": spread([r["samples_per_s"] for r in pr if "error" not in r]),
            "marl_model_rss_mib": spread([r["model_rss_mib"] for r in marl if "error" not in r]),
            "peer_model_rss_mib": spread([r["model_rss_mib"] for r in pr if "error" not in r]),
            "errors": [r.get("error") + f" ({r.get('log')})" for r in pr if "error" in r],
            "shims": next((r.get("shims") for r in pr if "error" not in r and r.get("shims")), []),
        }
    out["marl_errors"] = [r.get("error") + f" ({r.get('log')})" for r in marl if "error" in r]
    return out


def _fmt(s, digits=2):
    if not s:
        return "n/a"
    return f"{s['median']:.{digits}f} ({s['min']:.{digits}f}–{s['max']:.{digits}f})"


def markdown(results) -> str:
    unit = WORKLOADS[results.get("workload", "ppo")]["unit"]
    lines = [
        f"| size | dtype | quant | policies | peer | marl {unit}/s | peer {unit}/s | {unit}/s ratio (marl/peer) "
        "| marl model MiB | peer model MiB | model memory ratio (marl/peer) | pairs | notes |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in results["configs"]:
        s = c["summary"]
        for peer in c["peers"]:
            p = s[peer]
            notes = []
            if c["policies"] > 1:
                notes.append(f"peer = {c['policies']} separate jobs, run one after another; memory summed, "
                             "time per sample = total time / total samples")
                m, r = p["model_rss_ratio"], p["samples_per_s_ratio"]
                if m and r and peer == "trl-multi-adapter" and c["policies"] == 4:  # the target
                    notes.append(f"target mem ≤0.35x: {'met' if m['median'] <= 0.35 else 'NOT met'}; "
                                 f"time/sample no worse: {'met' if r['median'] >= 1 else 'NOT met'} (medians)")
            if p["shims"]:
                notes.append(f"peer ran with {len(p['shims'])} CPU-bitsandbytes shims (README; list in the JSON)")
            if p["errors"]:
                notes.append("peer errors: " + "; ".join(p["errors"]))
            if p.get("samples_per_s_ratio_by_iteration"):
                notes.append("lockstep; ratio by iteration pair: " + _fmt(p["samples_per_s_ratio_by_iteration"]))
            ph = p.get("phase_time_ratio") or {}
            if results.get("workload") == "grpo" and all(ph.get(k) for k in ("gen", "score", "train")):
                notes.append("time marl/peer: " + ", ".join(f"{k} {ph[k]['median']:.2f}"
                                                             for k in ("gen", "score", "train")))
            if s["marl_errors"]:
                notes.append("marl-ray errors: " + "; ".join(s["marl_errors"]))
            lines.append(
                f"| {c['size']} | {c['dtype']} | {c['quant']} | {c['policies']} | {peer} "
                f"| {_fmt(p['marl_samples_per_s'])} | {_fmt(p['peer_samples_per_s'])} | {_fmt(p['samples_per_s_ratio'])} "
                f"| {_fmt(p['marl_model_rss_mib'], 0)} | {_fmt(p['peer_model_rss_mib'], 0)} "
                f"| {_fmt(p['model_rss_ratio'])} | {p['pairs']} | {' / '.join(notes)} |")
    lines.append("")
    lines.append("Values: median (min–max) over the repeat rounds; a ratio is taken within each round, then summarized. "
                 f"{unit}/s ratio > 1: marl-ray faster; model memory ratio < 1: marl-ray leaner. "
                 f"torch threads: {results['threads']}."
                 + (" Workload: GRPO (16 prompts x G=4 = 64 completions of 16 tokens per optimizer step); "
                    "trl-grpo = TRL 1.16 GRPOTrainer with gradient checkpointing on (its default), trl-grpo-nogc "
                    "= off; marl-ray's gradient checkpointing: " + results.get("marl_gradient_checkpointing", "auto")
                    + "." if results.get("workload") == "grpo" else ""))
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workload", choices=sorted(WORKLOADS), default="ppo",
                    help="ppo: ppo_step.py against trl_peer.py (TRL 0.11.4); grpo: grpo_step.py against "
                         "trl_grpo_peer.py (TRL 1.16 GRPOTrainer, gradient checkpointing on and off)")
    ap.add_argument("--sizes", default="small", help="comma list of small,medium,large (built tiny Llamas) or "
                    "smollm2 (the real SmolLM2-135M-Instruct, 49k vocabulary; --workload grpo)")
    ap.add_argument("--lora-targets", default="auto",
                    help="--workload grpo: LoRA target_modules of both systems (a comma list, or all-linear); "
                         "auto: all-linear on a real model (smollm2), the workload's q_proj,v_proj on a tiny one")
    ap.add_argument("--dtypes", default="fp32", help="comma list of fp32,bf16")
    ap.add_argument("--quants", default="none", help="comma list of none,8bit,4bit")
    ap.add_argument("--policies", default="1", help="comma list of policy counts, e.g. 1,4")
    ap.add_argument("--peers", default=None, help=f"comma list of {','.join(PEERS)} (ppo; default both) or "
                    f"{','.join(GRPO_PEERS)} (grpo; default both)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--iters", type=int, default=None, help="passed on (default: 5, large 2)")
    ap.add_argument("--warmup", type=int, default=None, help="passed on (default: 2, large 1)")
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "marl-ray-bench"))
    ap.add_argument("--runtime", choices=["inprocess", "ray"], default="inprocess", help="marl-ray's runtime")
    ap.add_argument("--marl-args", default="", help="more ppo_step.py / grpo_step.py options for marl-ray's runs, e.g. "
                    "'--micro-batch-size 2' or '--gradient-checkpointing on'")
    ap.add_argument("--trl-python", default=str(ROOT / ".venv-trl" / "bin" / "python"))
    ap.add_argument("--marl-python", default=sys.executable)
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per process")
    ap.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--lockstep", action="store_true",
                    help="run a round's processes at once, taking turns iteration by iteration (see "
                         "benchmarks/turns.py): each marl-ray iteration lies next to a peer's, not half a minute "
                         "away; memory is per process as before (policies 1 only)")
    ap.add_argument("--dry-run", action="store_true", help="print the commands only")
    args = ap.parse_args(argv)

    sizes = args.sizes.split(",")
    dtypes = args.dtypes.split(",")
    quants = args.quants.split(",")
    policies = [int(x) for x in args.policies.split(",")]
    wl = WORKLOADS[args.workload]
    peers = [p for p in (args.peers if args.peers is not None else ",".join(wl["peers"])).split(",") if p]
    for p in peers:
        if p not in wl["peers"]:
            ap.error(f"unknown peer {p!r} for --workload {args.workload} (choose from {', '.join(wl['peers'])})")
    if args.lockstep and policies != [1]:
        ap.error("--lockstep needs --policies 1 (N TRL policies are N jobs run one after another)")
    if args.workload == "grpo" and quants != ["none"]:
        ap.error("--workload grpo: --quants none only (trl_grpo_peer.py runs no quantized base)")
    if "smollm2" in sizes and args.workload != "grpo":
        ap.error("--sizes smollm2: with --workload grpo only")
    if args.workload == "ppo" and peers and not Path(args.trl_python).exists():
        ap.error(f"{args.trl_python} missing: run `bash benchmarks/setup_trl_venv.sh` first")

    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    out_dir = Path(args.out_dir)
    logs = out_dir / f"{stamp}-logs"
    tmp = Path(tempfile.mkdtemp(prefix="sbs-"))
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    steps = {s: (args.iters or (2 if s == "large" else 5)) + (args.warmup if args.warmup is not None
                                                              else (1 if s == "large" else 2)) for s in sizes}
    max_steps = max(steps.values())
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    common = ["--threads", str(args.threads), "--workdir", str(work)]
    if args.iters is not None:
        common += ["--iters", str(args.iters)]
    if args.warmup is not None:
        common += ["--warmup", str(args.warmup)]

    def size_args(size: str) -> list[str]:
        """--size, and for the grpo workload the LoRA targets of both systems."""
        if args.workload != "grpo":
            return ["--size", size]
        targets = args.lora_targets
        if targets == "auto":
            targets = "all-linear" if size in REAL_BASES else None
        return ["--size", size] + (["--lora-targets", targets] if targets else [])

    configs = list(itertools.product(sizes, dtypes, quants, policies))
    if args.dry_run:
        for size, dtype, quant, npol in configs:
            cfg = size_args(size) + ["--dtype", dtype, "--quant", quant] + common
            print(args.marl_python, f"benchmarks/{wl['marl']}", *cfg, "--policies", str(npol), "--runtime",
                  args.runtime, *shlex.split(args.marl_args))
            for peer in peers:
                print(f"{npol} x", *peer_command(args.workload, peer, cfg, 0, Path("OUT.json"), args.trl_python,
                                                 args.marl_python)[:-2])
        return 0
    logs.mkdir(parents=True, exist_ok=True)
    print(f"building the workload in {work} ...", file=sys.stderr)
    prepare_workload(work, sizes, n_prompts=16 * max_steps, workload=args.workload, steps=steps)

    marl_gc = "auto"
    marl_opts = shlex.split(args.marl_args)
    if "--gradient-checkpointing" in marl_opts[:-1]:
        marl_gc = marl_opts[marl_opts.index("--gradient-checkpointing") + 1]
    results = {"timestamp": stamp, "workload": args.workload, "marl_gradient_checkpointing": marl_gc,
               "threads": args.threads, "repeats": args.repeats, "workdir": str(work),
               "host": os.uname().nodename, "cpu_count": os.cpu_count(), "argv": sys.argv[1:], "configs": []}
    out_json = out_dir / f"{stamp}.json"

    def save():
        out_dir.mkdir(parents=True, exist_ok=True)
        out_json.write_text(json.dumps(results, indent=2))

    n = 0
    for size, dtype, quant, npol in configs:
        cfg = size_args(size) + ["--dtype", dtype, "--quant", quant] + common
        tag = f"{size}-{dtype}-{quant}-p{npol}"
        entry = {"size": size, "dtype": dtype, "quant": quant, "policies": npol, "peers": peers,
                 "lockstep": args.lockstep,
                 "runs": {"marl-ray": [], **{p: [] for p in peers}}}
        results["configs"].append(entry)
        for r in range(args.repeats):
            n += 1
            j = tmp / f"{tag}-r{r}-marl.json"
            marl = ([args.marl_python, f"benchmarks/{wl['marl']}", *cfg, "--policies", str(npol),
                     "--runtime", args.runtime, "--json", str(j), *shlex.split(args.marl_args)],
                    logs / f"{tag}-r{r}-marl-ray.log", j)
            peer_jobs = {peer: [(peer_command(args.workload, peer, cfg, k, tmp / f"{tag}-r{r}-{peer}-{k}.json",
                                              args.trl_python, args.marl_python),
                                 logs / f"{tag}-r{r}-{peer}-{k}.log", tmp / f"{tag}-r{r}-{peer}-{k}.json")
                                for k in range(npol)] for peer in peers}
            if args.lockstep:
                names = ["marl-ray", *peers]
                print(f"[{tag} round {r + 1}/{args.repeats}] {', '.join(names)} in lockstep ...", file=sys.stderr,
                      flush=True)
                got = run_lockstep([marl] + [peer_jobs[p][0] for p in peers], env, tmp / f"{tag}-r{r}-turns",
                                   args.timeout)
                for name, res in zip(names, got):
                    entry["runs"][name].append(res)
                    print(f"    {name}: {_brief(res)}", file=sys.stderr, flush=True)
                save()
                continue
            print(f"[{tag} round {r + 1}/{args.repeats}] marl-ray ...", file=sys.stderr, flush=True)
            res = run_one(*marl, env, args.timeout)
            entry["runs"]["marl-ray"].append(res)
            print(f"    {_brief(res)}", file=sys.stderr, flush=True)
            for peer in peers:
                jobs = []
                for k, job in enumerate(peer_jobs[peer]):
                    print(f"[{tag} round {r + 1}/{args.repeats}] {peer}"
                          + (f" job {k + 1}/{npol}" if npol > 1 else "") + " ...", file=sys.stderr, flush=True)
                    jobs.append(run_one(*job, env, args.timeout))
                    print(f"    {_brief(jobs[-1])}", file=sys.stderr, flush=True)
                entry["runs"][peer].append(jobs[0] if npol == 1 else aggregate_jobs(jobs, npol))
            save()
        entry["summary"] = summarize(entry)
        save()
    table = markdown(results)
    results["table_md"] = table
    save()
    out_json.with_suffix(".md").write_text(table + "\n")
    print(json.dumps({"results": str(out_json), "configs": [
        {k: c[k] for k in ("size", "dtype", "quant", "policies")} | {"summary": c["summary"]}
        for c in results["configs"]]}, indent=2))
    print()
    print(table)
    return 0


def _brief(res):
    if "error" in res:
        return f"FAILED {res['error']}: {res['log']}\n      " + "\n      ".join(res.get("tail", [])[-5:])
    unit = "completions" if res.get("workload") == "grpo" else "samples"
    return (f"{res['samples_per_s']:.3f} {unit}/s, step {res['step_s_median']:.2f}s "
            f"(gen {res['gen_s_median']:.2f}, score {res['score_s_median']:.2f}, train {res['train_s_median']:.2f}), "
            f"model {res['model_rss_mib']:.0f} MiB, peak {res['peak_rss_mib']:.0f} MiB")


if __name__ == "__main__":
    sys.exit(main())
