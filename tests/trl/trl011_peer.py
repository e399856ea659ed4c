"""The TRL 0.11.4 side of tests/trl/test_trl_interop.py, run with .venv-trl011's python.

    python trl011_peer.py JOBS.json

JOBS.json is a list of jobs; each writes a .pt file of what TRL computed:
- {"op": "load", "dir": D, "out": O}: TRL's from_pretrained(D), eval mode, one forward pass on
  `ids`: logits, values and the v_head weights (with "expect_error": true, only the error, if any).
- {"op": "save", "base": B, "dir": D, "peft": bool, "seed": S, "out": O}: TRL's from_pretrained(B)
  (with a LoRA peft_config when peft), LoRA B weights and v_head set to seeded noise, then
  save_pretrained(D) (sharded with "shard": SIZE), and the same forward pass.
"""

import json
import os
import sys

import torch

torch.set_num_threads(1)


def forward(model, ids, out):
    model.eval()
    with torch.no_grad():
        logits, _, values = model(input_ids=torch.tensor(ids))
    torch.save({"logits": logits, "values": values, "is_peft": model.is_peft_model,
                "v_head": {k: v.clone() for k, v in model.v_head.summary.state_dict().items()}}, out)


def main(jobs):
    from peft import LoraConfig
    from trl import AutoModelForCausalLMWithValueHead as TRLModel

    for job in jobs:
        if job["op"] == "load" and job.get("expect_error"):
            try:
                TRLModel.from_pretrained(job["dir"])
                error = None
            except Exception as e:  # noqa: BLE001 (recorded for the test to check)
                error = f"{type(e).__name__}: {e}"
            torch.save({"error": error}, job["out"])
        elif job["op"] == "load":
            forward(TRLModel.from_pretrained(job["dir"]), job["ids"], job["out"])
        elif job["op"] == "save":
            cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                             task_type="CAUSAL_LM") if job["peft"] else None
            model = TRLModel.from_pretrained(job["base"], peft_config=cfg)
            gen = torch.Generator().manual_seed(job["seed"])
            with torch.no_grad():
                noisy = [p for n, p in model.named_parameters() if "lora_B" in n] + list(model.v_head.parameters())
                for p in noisy:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
            os.makedirs(job["dir"], exist_ok=True)  # TRL 0.11 writes its v_head file before peft makes the folder
            if job.get("shard"):
                model.save_pretrained(job["dir"], max_shard_size=job["shard"])
            else:
                model.save_pretrained(job["dir"])
            forward(model, job["ids"], job["out"])
        else:
            raise ValueError(job["op"])


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        main(json.load(f))
