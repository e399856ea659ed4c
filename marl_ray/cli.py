"""`marl-ray`: the command line. Each stage is a subcommand; `demo` runs all three.

    marl-ray rl --config deployments/configs/local.yaml --set ppo.steps=5
    python -m marl_ray rl --config ...        (the form used with `ray job submit`)

`rl` runs every algorithm (ppo, grpo, rloo, reinforce_pp and the DAPO / Dr. GRPO losses); `ppo` is
the same command under its earlier name.
"""

from __future__ import annotations

import argparse
import sys
import textwrap


def algorithms_text() -> str:
    """The algorithms `marl-ray rl` runs, as the config schema names them."""
    from typing import get_args, get_type_hints

    from marl_ray.config import PolicySpec
    from marl_ray.config.schema import ALGORITHMS

    losses = get_args(get_type_hints(PolicySpec)["loss_type"])
    return (f"policies[].algorithm: {', '.join(ALGORITHMS)}; for grpo, rloo and reinforce_pp, policies[].loss_type: "
            f"{', '.join(losses)} (dapo = DAPO's token-level loss, with epsilon_high and dynamic_sampling for the "
            "rest of DAPO; dr_grpo with scale_rewards: false = Dr. GRPO)")


def _rl(argv: list[str], name: str = "rl") -> int:
    from marl_ray.config import PPORunConfig, add_config_args, config_from_args

    parser = argparse.ArgumentParser(
        prog=f"marl-ray {name}",
        description=textwrap.fill(
                    "Stage 3: RL of several LoRA policies on one shared (optionally quantized) base, on Ray, each "
                    f"with its own algorithm ({algorithms_text()}). Policies are scored by reward adapters "
                    "on the same base and/or reward functions; the reference is the base with adapters disabled. "
                    "Writes metrics.jsonl, samples.jsonl, eval.jsonl (with held-out prompts), log.txt, TensorBoard "
                    "logs and policies/NAME under run.out_dir."
                    + (" `marl-ray ppo` is this command's earlier name: the same command, the same options."
                       if name == "ppo" else " Also available under its earlier name, `marl-ray ppo`."), 100))
    add_config_args(parser, PPORunConfig)
    parser.add_argument("--resume", nargs="?", const="latest", default=None, metavar="CHECKPOINT",
                        help="resume from the latest checkpoint of run.out_dir, or from the given checkpoint folder")
    args = parser.parse_args(argv)
    if args.resume:
        args.set = list(args.set or []) + [f"run.resume={args.resume}"]
    cfg = config_from_args(args, PPORunConfig)  # validated before any actor starts
    from marl_ray.stages.ppo import run_ppo

    summary = run_ppo(cfg)
    print(f"done: {summary['steps']} steps in {summary['wall_s']:.1f}s; policies saved to "
          + ", ".join(f"{k}: {v}" for k, v in summary["saved"].items()))
    return 0


def _demo(argv: list[str]) -> int:
    from marl_ray.stages.demo import main_demo

    return main_demo(argv)


def _sft(argv: list[str]) -> int:
    from marl_ray.stages.sft import main_sft

    return main_sft(argv)


def _reward(argv: list[str]) -> int:
    from marl_ray.stages.reward import main_reward

    return main_reward(argv)


def _ppo(argv: list[str]) -> int:
    return _rl(argv, "ppo")


COMMANDS = {"rl": _rl, "ppo": _ppo, "demo": _demo, "sft": _sft, "reward": _reward}


def console_flags(argv: list[str]) -> tuple[list[str], str, bool]:
    """(argv without them, log level, quiet): --quiet / -q and --log-level LEVEL, anywhere in argv."""
    rest, level, quiet = [], "INFO", False
    it = iter(argv)
    for a in it:
        if a in ("--quiet", "-q"):
            quiet = True
        elif a == "--log-level":
            level = next(it, None)
            if level is None:
                raise SystemExit("marl-ray: --log-level needs a value: one of DEBUG, INFO, WARNING, ERROR")
        elif a.startswith("--log-level="):
            level = a.split("=", 1)[1]
        else:
            rest.append(a)
    return rest, level, quiet


def main(argv: list[str] | None = None) -> int:
    from marl_ray import console

    argv, level, quiet = console_flags(list(sys.argv[1:] if argv is None else argv))
    try:
        console.setup(level, quiet)
    except ValueError as e:
        print(f"marl-ray: {e}", file=sys.stderr)
        return 2
    top = argparse.ArgumentParser(
        prog="marl-ray",
        description="Multi-Adapter RL on Ray: SFT, reward-adapter training and RL (PPO, GRPO, RLOO, REINFORCE++) "
                    "of several LoRA policies, all on one shared base model.",
        epilog="Run `marl-ray COMMAND --help` for the options of a command. Every command also takes --quiet "
               "(warnings and errors only, no progress bars) and --log-level LEVEL (DEBUG, INFO, WARNING, ERROR; "
               "default INFO); the full log goes to the run folder's log.txt either way.")
    top.add_argument("command", choices=sorted(COMMANDS),
                     help="sft: stage 1 (base on the target domain); reward: stage 2 (reward adapter); "
                          "rl: stage 3 (policies on Ray, each with its algorithm: ppo, grpo, rloo, reinforce_pp, "
                          "with the DAPO and Dr. GRPO losses); ppo: the same as rl (its earlier name); "
                          "demo: all three on an embedded task")
    top.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only, no progress bars")
    top.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                     help="console log level (default INFO)")
    if not argv or argv[0] in ("-h", "--help"):
        top.print_help()
        return 0 if argv else 2
    if argv[0] not in COMMANDS:
        top.parse_args(argv[:1])  # prints the choices and exits 2
    from marl_ray.config import ConfigError

    try:
        return COMMANDS[argv[0]](argv[1:])
    except ConfigError as e:
        print(f"marl-ray {argv[0]}: config error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
