"""Stage 3: PPO of several policy adapters on one shared base, on Ray."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from marl_ray.config import ConfigError, PPORunConfig, save_config

log = logging.getLogger(__name__)


def check_inputs(cfg: PPORunConfig):
    """Fail before any actor starts: paths that must exist locally, named by their config field."""
    def local(path: str) -> bool:
        return path.startswith((".", "/", "~")) or Path(path).exists()

    if local(cfg.model.base) and not Path(cfg.model.base).expanduser().exists():
        raise ConfigError(f"model.base: {cfg.model.base!r} does not exist")
    for i, r in enumerate(cfg.rewards):
        if local(r.path) and not Path(r.path).expanduser().exists():
            raise ConfigError(f"rewards[{i}].path: {r.path!r} does not exist (train one with `marl-ray reward`)")
    for i, p in enumerate(cfg.policies):
        if p.init_from and not Path(p.init_from).expanduser().exists():
            raise ConfigError(f"policies[{i}].init_from: {p.init_from!r} does not exist")
    if cfg.data.prompts != "embedded" and not Path(cfg.data.prompts).exists():
        raise ConfigError(f"data.prompts: {cfg.data.prompts!r} does not exist (a JSONL file with a 'prompt' field, "
                          "or 'embedded')")


def run_ppo(cfg: PPORunConfig, on_step=None, keep_ray: bool = False) -> dict:
    """Train every policy of `cfg` for cfg.ppo.steps steps; save them under out_dir/policies/NAME.

    Returns a summary: final metrics per policy, hosts, checksums, the prompt ledger, timings.
    """
    import ray

    from marl_ray.cluster import init_ray, shutdown_actors, start_actors
    from marl_ray.learner import Learner
    from marl_ray.metrics import MetricsLogger

    check_inputs(cfg)
    out = Path(cfg.run.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    started_here = not ray.is_initialized()
    init_ray(cfg.cluster.address)
    hosts, workers, pg = [], [], None
    logger = MetricsLogger(out, tensorboard=cfg.run.tensorboard)
    try:
        t0 = time.perf_counter()
        hosts, workers, worker_host, placement = start_actors(cfg, seed=cfg.run.seed)
        pg = placement.pg
        infos = ray.get([h.info.remote() for h in hosts])
        fps = {i["fingerprint"] for i in infos}
        if len(fps) != 1:
            raise RuntimeError(f"hosts loaded different bases: {[i['fingerprint'] for i in infos]}")
        log.info("%d host(s) on nodes %s; base %s (%s)", len(hosts), [i["node_id"][:8] for i in infos],
                 infos[0]["fingerprint"], infos[0]["quantization"])
        learner = Learner(cfg, hosts, workers, worker_host, logger)
        learner.fit(on_step=on_step)
        saved = {}
        for p in learner.policies:
            saved[p] = ray.get(hosts[0].save_state.remote(p, str(out / "policies" / p)))
        infos = ray.get([h.info.remote() for h in hosts])
        summary = {
            "policies": {p: learner.history[-1]["metrics"][p] for p in learner.policies},
            "saved": saved, "hosts": infos, "checksums": learner.checksums(), "ledger": learner.ledger,
            "steps": learner.step, "wall_s": time.perf_counter() - t0,
        }
        (out / "ppo_summary.json").write_text(json.dumps(summary, indent=2, default=str))
        return summary
    finally:
        logger.close()
        shutdown_actors(workers + hosts, pg)
        if started_here and not keep_ray:
            ray.shutdown()
