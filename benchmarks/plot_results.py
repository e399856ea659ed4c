"""Plot a side_by_side.py result: samples/s and memory per configuration and implementation.

    python benchmarks/plot_results.py benchmarks/results/20260101-120000.json [-o out.png]

Bars are the median over the repeat rounds, whiskers the min-max. Two memory panels: the whole
process's peak RSS, and the model's share (peak above the RSS right after the imports). For
--policies N > 1 a peer bar is the sum over its N separate jobs (see side_by_side.py).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import spread  # noqa: E402

COLORS = {"marl-ray": "#1f77b4", "trl-multi-adapter": "#ff7f0e", "three-model": "#2ca02c"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", help="a benchmarks/results/<timestamp>.json")
    ap.add_argument("-o", "--out", default=None, help="PNG path (default: next to the JSON)")
    args = ap.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads(Path(args.results).read_text())
    if "configs" not in data:
        sys.exit(f"{args.results} is not a side_by_side.py result (no 'configs')")
    configs = data["configs"]
    impls = ["marl-ray"] + [p for p in ("trl-multi-adapter", "three-model")
                            if any(p in c["runs"] for c in configs)]
    labels = [f"{c['size']}\n{c['dtype']} {c['quant']}\n{c['policies']} pol." for c in configs]
    metrics = [("samples_per_s", "samples / s (higher is better)"),
               ("peak_rss_mib", "peak RSS, MiB"),
               ("model_rss_mib", "model RSS (peak - after imports), MiB")]
    fig, axes = plt.subplots(len(metrics), 1, figsize=(max(6, 1.6 * len(configs) * len(impls) / 2 + 3), 10),
                             squeeze=False)
    width = 0.8 / len(impls)
    for ax, (key, title) in zip(axes[:, 0], metrics):
        for k, impl in enumerate(impls):
            xs, meds, lo, hi = [], [], [], []
            for i, c in enumerate(configs):
                s = spread([r.get(key) for r in c["runs"].get(impl, []) if "error" not in r])
                if not s:
                    continue
                xs.append(i + (k - (len(impls) - 1) / 2) * width)
                meds.append(s["median"])
                lo.append(s["median"] - s["min"])
                hi.append(s["max"] - s["median"])
            ax.bar(xs, meds, width, yerr=[lo, hi], capsize=3, label=impl, color=COLORS.get(impl))
        ax.set_title(title)
        ax.set_xticks(range(len(configs)))
        ax.set_xticklabels(labels, fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    fig.suptitle(f"reference PPO workload, {data.get('threads')} torch threads, {data.get('repeats')} rounds "
                 f"({data.get('timestamp')})", fontsize=10)
    fig.tight_layout()
    out = Path(args.out) if args.out else Path(args.results).with_suffix(".png")
    fig.savefig(out, dpi=110)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
