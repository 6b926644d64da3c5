"""The PyTorch peer of `dsv3-bench train`: Hugging Face transformers' DeepseekV3 on the same config.

    python -m dsv3_jax.bench.hf_peer --config proxy-1gpu --batch 2 --seq 4096 --steps 5     # one JSON line

BF16 weights, SDPA attention and the grouped_mm experts kernel; each step is forward (next-token
cross-entropy, HF's own loss) + backward, no optimizer: what REFERENCE.md's peer figure measures. HF's
DeepseekV3 has no MTP module, so its FLOPs are counted without MTP. Needs torch + transformers and a GPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from dsv3_jax.bench.timing import DATE


def run_peer(config: str, batch: int, seq: int, steps: int) -> dict:
    import torch
    import transformers

    from dsv3_jax.config import load_config
    from dsv3_jax.train.flops import PEAK_BF16_FLOPS, train_flops_per_token

    cfg = load_config(config)
    hf_cfg = transformers.DeepseekV3Config(**cfg.to_hf_dict())
    hf_cfg._attn_implementation = "sdpa"
    hf_cfg._experts_implementation = "grouped_mm"
    device = "cuda" if torch.cuda.is_available() else "cpu"     # CPU: only to check this script on small configs
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.DeepseekV3ForCausalLM(hf_cfg).to(torch.bfloat16)
    model.train()
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq), device=device)

    def step() -> float:
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        model.zero_grad(set_to_none=True)
        return loss.detach().item()

    sync()
    t0 = time.perf_counter()
    loss = step()
    sync()
    first_step_s = time.perf_counter() - t0
    step()
    times = []
    for _ in range(steps):
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)
    flops_tok = train_flops_per_token(cfg.replace(num_nextn_predict_layers=0), seq, with_mtp=False)
    tok_s = batch * seq / step_s
    record = {"bench": "train", "date": DATE, "device": name, "impl": "hf_torch", "mode": "fwd_bwd",
              "precision": "bf16", "config": config, "batch": batch, "seq": seq, "mtp": False,
              "torch": torch.__version__, "transformers": transformers.__version__,
              "attn": model.config._attn_implementation, "experts": model.config._experts_implementation,
              "step_s": step_s, "step_s_all": times, "tokens_per_s": tok_s, "model_tflops": flops_tok * tok_s / 1e12,
              "mfu": flops_tok * tok_s / peak if peak else None, "first_step_s": first_step_s, "loss": loss,
              "peak_mem_gb": torch.cuda.max_memory_allocated() / 1e9 if device == "cuda" else None}
    print(json.dumps(record), flush=True)
    return record


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="proxy-1gpu")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--steps", type=int, default=5)
    a = p.parse_args()
    run_peer(a.config, a.batch, a.seq, a.steps)


if __name__ == "__main__":
    main()
