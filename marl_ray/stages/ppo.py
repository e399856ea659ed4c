"""Stage 3: PPO of several policy adapters on one shared base, on Ray."""

from __future__ import annotations

import contextlib
import json
import logging
import time
from pathlib import Path

from marl_ray import console
from marl_ray.config import ConfigError, PPORunConfig, save_config
from marl_ray.data.prompts import eval_rows, is_conversation

log = logging.getLogger(__name__)


def check_lora_targets(cfg: PPORunConfig):
    """Each new policy's lora.target_modules must match modules of the base (a local folder: read from its
    config alone, no weights); the error names the base's linear layers. A hub id is checked by the hosts."""
    from marl_ray.model import targets

    named = [(i, p.lora.target_modules) for i, p in enumerate(cfg.policies) if not p.init_from
             and p.lora.target_modules is not None and not targets.is_all_linear(p.lora.target_modules)]
    skeleton = targets.skeleton(cfg.model.base) if named else None
    for i, modules in named if skeleton is not None else ():
        try:
            targets.check(modules, skeleton, f"policies[{i}].lora.target_modules")
        except targets.TargetModulesError as e:
            raise ConfigError(str(e)) from None


def check_inputs(cfg: PPORunConfig):
    """Fail before any actor starts: paths that must exist locally, named by their config field."""
    def local(path: str) -> bool:
        return path.startswith((".", "/", "~")) or Path(path).exists()

    if local(cfg.model.base) and not Path(cfg.model.base).expanduser().exists():
        raise ConfigError(f"model.base: {cfg.model.base!r} does not exist")
    from marl_ray.model.gguf import GGUFError, resolve_base

    for field, path in (("model.base", cfg.model.base), ("model.tokenizer", cfg.model.tokenizer)):
        try:  # a .gguf file: refused (named) or dequantized once here, before any actor starts
            resolve_base(path)
        except GGUFError as e:
            raise ConfigError(f"{field}: {e}") from None
    for i, r in enumerate(cfg.rewards):
        if r.path is None:
            continue
        if local(r.path) and not Path(r.path).expanduser().exists():
            raise ConfigError(f"rewards[{i}].path: {r.path!r} does not exist (train one with `marl-ray reward`)")
        folder = Path(r.path).expanduser()
        if folder.is_dir():  # a half-written folder fails here, not inside a host actor
            from marl_ray.model.adapter_io import ADAPTER_CONFIG, ADAPTER_WEIGHTS, ADAPTER_WEIGHTS_BIN

            missing = [] if (folder / ADAPTER_CONFIG).is_file() else [ADAPTER_CONFIG]
            if not ((folder / ADAPTER_WEIGHTS).is_file() or (folder / ADAPTER_WEIGHTS_BIN).is_file()):
                missing.append(ADAPTER_WEIGHTS)
            if missing:
                raise ConfigError(f"rewards[{i}].path: {r.path!r} has no {' or '.join(missing)}: not a complete "
                                  "peft adapter folder (half-written?); save it again")
    for i, p in enumerate(cfg.policies):
        if p.init_from and not Path(p.init_from).expanduser().exists():
            raise ConfigError(f"policies[{i}].init_from: {p.init_from!r} does not exist")
    check_lora_targets(cfg)
    if cfg.episodes is not None:  # the environment, its players and the chat template: before any actor
        from marl_ray.episodes.runner import plan

        plan(cfg)
    if cfg.run.storage:  # an unreachable or malformed storage fails here, not at the first checkpoint
        from marl_ray.storage import Storage

        try:
            Storage(cfg.run.storage).listdir("checkpoints")
        except Exception as e:
            raise ConfigError(f"run.storage: {cfg.run.storage!r} cannot be opened: {e}") from e
    columns: list[str] = []
    if cfg.data.prompts != "embedded":  # a malformed row fails here (named), not inside a rollout worker
        from marl_ray.runtime.rollout import load_prompt_rows

        try:
            prompts, rows = load_prompt_rows(cfg.data.prompts, split=cfg.data.split, prompt_field=cfg.data.prompt_field)
        except ValueError as e:
            raise ConfigError(f"data.prompts: {e}") from None
        columns = sorted({k for r in rows for k in r})
        if any(is_conversation(p) for p in prompts):
            _require_chat_template(cfg, "data.prompts")
    field = "data.eval_prompts" if cfg.data.eval_prompts is not None else "data.eval_fraction"
    try:
        heldout = eval_rows(cfg.data)
    except ValueError as e:
        raise ConfigError(f"{field}: {e}") from None
    if heldout is not None and any(is_conversation(p) for p in heldout[0]):
        _require_chat_template(cfg, field)
    from marl_ray.train import rewards

    for i, r in enumerate(cfg.rewards):  # importable, callable as fn(prompts, completions, **columns)
        if r.function is not None:
            field_ = f"rewards[{i}].function"
            fn = rewards.RewardFunction.from_spec(r.name, r.function, field_)
            rewards.check_function(fn, field_, columns)
            if heldout is not None and cfg.data.eval_prompts is not None:
                eval_columns = sorted({k for c in heldout[1] for k in c})
                rewards.check_function(fn, f"{field_} (on data.eval_prompts)", eval_columns)


def _require_chat_template(cfg: PPORunConfig, field: str):
    from transformers import AutoTokenizer

    from marl_ray.model.gguf import resolve_base

    tok = AutoTokenizer.from_pretrained(resolve_base(cfg.model.tokenizer or cfg.model.base))
    if not getattr(tok, "chat_template", None):
        raise ConfigError(f"{field}: {getattr(cfg.data, field.split('.')[1])} holds conversations, but the tokenizer "
                          f"of {cfg.model.tokenizer or cfg.model.base} has no chat template: give it one or use "
                          "text prompts")


def run_ppo(cfg: PPORunConfig, on_step=None, keep_ray: bool = False, gold_fn=None, on_start=None,
            on_end=None) -> dict:
    """Train every policy of `cfg` for cfg.ppo.steps steps; save them under out_dir/policies/NAME.

    Returns a summary: final metrics per policy, hosts, checksums, the prompt ledger, timings.
    `on_start(learner)` / `on_end(learner)` run before the first and after the last step (the
    demo samples held-out prompts there); `gold_fn(texts) -> scores` adds a gold metric.
    """
    import ray

    from marl_ray.runtime.handles import get
    from marl_ray.runtime.placement import init_ray, shutdown_actors, start_actors, start_inprocess
    from marl_ray.train.loop import Learner
    from marl_ray.metrics import MetricsLogger

    check_inputs(cfg)
    out = Path(cfg.run.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    inprocess = cfg.cluster.runtime == "inprocess"
    started_here = not inprocess and not ray.is_initialized()
    if not inprocess:
        init_ray(cfg.cluster.address)
    actors, learner = None, None
    # per-step lines on the console only without a progress bar (the bar shows each policy's reward)
    from marl_ray.config import to_dict

    logger = MetricsLogger(out, report_to=cfg.run.loggers, config=to_dict(cfg),
                           echo=not console.progress(cfg.run.progress) and not console.quiet())
    file_log = contextlib.ExitStack()  # out/log.txt, once the run is past its refusals
    try:
        t0 = time.perf_counter()
        actors = (start_inprocess if inprocess else start_actors)(cfg, seed=cfg.run.seed)
        infos = get([h.info.remote() for h in actors.hosts])
        fps = {i["fingerprint"] for i in infos}
        if len(fps) != 1:
            raise RuntimeError(f"hosts loaded different bases: {[i['fingerprint'] for i in infos]}")
        log.info("%d host(s) on nodes %s; base %s (%s)", len(actors.hosts), [str(i["node_id"])[:8] for i in infos],
                 infos[0]["fingerprint"], infos[0]["quantization"])
        learner = Learner(cfg, actors.hosts, actors.workers, actors.worker_host, logger, gold_fn=gold_fn,
                          host_nodes=actors.host_nodes, respawn_worker=actors.respawn_worker)
        if cfg.run.resume:
            learner.load_checkpoint(cfg.run.resume)
            logger.truncate(learner.step)  # metrics of steps after the checkpoint are redone
        else:
            logger.truncate(0)  # a fresh run in an old folder starts a fresh metrics file
        # Only now: a run refused above (bad adapter, mismatching checkpoint) leaves the folder as it was.
        save_config(cfg, out / "config.yaml")
        file_log.enter_context(console.log_file(out))
        extra = {"start": on_start(learner) if on_start else None}
        heldout = eval_rows(cfg.data)
        evals: dict[int, dict] = {}

        def evaluate_heldout():
            evals[learner.step] = learner.heldout(*heldout, seed=cfg.run.seed + 7)
            logger.log_eval(learner.step, evals[learner.step])

        def after_step(step, metrics):
            if on_step is not None:
                on_step(step, metrics)
            done = step + 1
            if heldout and cfg.run.eval_every and done % cfg.run.eval_every == 0 and done < cfg.ppo.steps:
                evaluate_heldout()

        log.info("training %s for %d steps of %d prompts -> %s (log: %s)",
                 ", ".join(f"{p.name} ({p.algorithm}{', G=%d' % p.num_generations if p.num_generations > 1 else ''})"
                           for p in cfg.policies), cfg.ppo.steps, cfg.ppo.batch_size, out, out / "log.txt")
        if heldout and learner.step < cfg.ppo.steps:
            evaluate_heldout()
        learner.fit(on_step=after_step)
        if heldout and learner.step not in evals:
            evaluate_heldout()
        extra["end"] = on_end(learner) if on_end else None
        checkpoint_path = learner.save_checkpoint()
        if learner.storage is not None:
            checkpoint_path = learner.storage.describe(checkpoint_path)
        saved = learner.export_policies()
        infos = learner.hosts.all("info")
        summary = {
            "policies": {p: learner.history[-1]["metrics"][p] for p in learner.policies},
            "saved": saved, "hosts": infos, "checksums": learner.checksums(), "ledger": learner.ledger,
            "steps": learner.step, "wall_s": time.perf_counter() - t0, "extra": extra,
            "checkpoint": str(checkpoint_path), "recoveries": learner.recoveries, "skip_count": learner.skip_count,
        }
        if evals:  # held-out evaluations: first and last of this run, and all of them by steps done
            first, last = min(evals), max(evals)
            summary["eval"] = {"before": evals[first], "after": evals[last], "steps": [first, last],
                               "prompts": len(heldout[0]), "all": evals}
        (out / "ppo_summary.json").write_text(json.dumps(summary, indent=2, default=str))
        return summary
    finally:
        file_log.close()
        logger.close()
        if actors is not None:  # the learner's workers: it may have started some anew
            workers = learner.workers if learner is not None else actors.workers
            shutdown_actors(list(workers) + list(actors.hosts), actors.pg)
        if started_here and not keep_ray:
            ray.shutdown()
