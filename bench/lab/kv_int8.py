"""int8 KV log, measured offline: what per-token int8 quantization of the stored K/V would cost in accuracy.

Reads the real session of ``bench/lab/retrieval_capture.py`` (16k tokens of ``big`` text, SmolLM2-135M,
bf16 KV log) and quantizes every layer's K and V symmetrically to int8 with one scale per token
(``"token"``: the 3 kv heads x 64 values of a token share a scale, 2 bytes) or per token and kv head
(``"token-head"``: 64 values per scale). Measured per layer, then averaged:

* relative reconstruction error ``||x - q(x)|| / ||x||`` of K and V;
* the effect on attention, with the real probe queries of the capture (8 questions x 4 query tokens,
  rotated to the question's position): over a window of the last ``--window`` logged tokens, per
  query head, the attention distribution with bf16 vs int8 K (KL divergence, total variation, top-1
  attended token agreement) and the attention output ``sum_t p_t v_t`` with int8 K and V (relative
  error vs bf16).

Disk per token: bf16 23,040 B; int8 11,520 B + scales (60 B per token for ``"token"``, 180 B for
``"token-head"``): ~0.50-0.51x. This is a measurement, not a product path: the log, the connector and
the engines read bf16 (a design note is in ``bench/results/retrieval_index.md``).

    .venv/bin/python -m bench.lab.kv_int8 [--window 2048] [--layers 0,5,10,15,20,25,29]
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.eval.common import machine, table, write_results

REAL = Path.home() / ".cache" / "emserve" / "bench" / "real16k"


def quantize(x: torch.Tensor, per_head: bool) -> torch.Tensor:
    """Symmetric int8 round trip of ``x [n, H, D]`` with one scale per token (or per token and head)."""
    flat = x if per_head else x.reshape(x.shape[0], 1, -1)
    scale = flat.abs().amax(dim=-1, keepdim=True).clamp_min(1e-8) / 127.0
    scale = scale.to(torch.float16).to(torch.float32)  # scales stored as fp16
    q = torch.clamp(torch.round(flat / scale), -127, 127)
    return (q * scale).reshape(x.shape)


def main() -> None:
    from transformers import AutoConfig

    from emserve.retrieval.kvlog import KVLog
    from emserve.server.engine.rope import RopeSpec
    from emserve.server.provision.models import resolve_model

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--window", type=int, default=2048)
    ap.add_argument("--layers", default="0,5,10,15,20,25,29")
    ap.add_argument("--out", default="kv_int8")
    args = ap.parse_args()
    spec = resolve_model(None)
    rope = RopeSpec.from_hf_config(AutoConfig.from_pretrained(spec.path))
    log = KVLog.open(REAL / "log")
    ask = np.load(REAL / "queries.npz")["ask_queries"]  # [A, n, L, H, D], pre-RoPE
    n = len(log)
    lo = n - args.window
    pos_k = torch.from_numpy(log.positions(lo, n).astype(np.int64))
    q_pos = int(pos_k.max()) + 1
    a, nq, _, heads, d = ask.shape
    group = heads // log.layout.num_kv_heads
    out: dict[str, Any] = {}
    for mode in ("token", "token-head"):
        per: dict[str, list[float]] = {k: [] for k in ("k_err", "v_err", "kl", "tv", "top1", "out_err")}
        for layer in (int(x) for x in args.layers.split(",")):
            k = log.keys(layer, lo, n).to(torch.float32)  # [W, Hkv, D] post-RoPE
            v = log.values(layer, lo, n).to(torch.float32)
            kq, vq = quantize(k, mode == "token-head"), quantize(v, mode == "token-head")
            per["k_err"].append(float((k - kq).norm() / k.norm()))
            per["v_err"].append(float((v - vq).norm() / v.norm()))
            q = torch.from_numpy(ask[:, :, layer].reshape(a * nq, heads, d))
            q = rope.rotate(q, torch.full((a * nq,), q_pos, dtype=torch.int64))  # [Q, H, D]
            kh = k.repeat_interleave(group, dim=1)  # [W, H, D]
            khq = kq.repeat_interleave(group, dim=1)
            vh, vhq = v.repeat_interleave(group, dim=1), vq.repeat_interleave(group, dim=1)
            s = torch.einsum("qhd,whd->qhw", q, kh) / d**0.5
            sq = torch.einsum("qhd,whd->qhw", q, khq) / d**0.5
            p, pq = s.softmax(-1), sq.softmax(-1)
            per["kl"].append(float((p * (p.clamp_min(1e-30).log() - pq.clamp_min(1e-30).log())).sum(-1).mean()))
            per["tv"].append(float(0.5 * (p - pq).abs().sum(-1).mean()))
            per["top1"].append(float((p.argmax(-1) == pq.argmax(-1)).float().mean()))
            o = torch.einsum("qhw,whd->qhd", p, vh)
            oq = torch.einsum("qhw,whd->qhd", pq, vhq)
            per["out_err"].append(float(((o - oq).norm(dim=-1) / o.norm(dim=-1).clamp_min(1e-12)).mean()))
        out[mode] = {k: {"mean": float(np.mean(v)), "max": float(np.max(v))} for k, v in per.items()}
    bf16 = log.layout.bytes_per_token
    int8 = {"token": bf16 // 2 + 2 * 2 * log.layout.num_layers,
            "token-head": bf16 // 2 + 2 * 2 * log.layout.num_layers * log.layout.num_kv_heads}
    rows = [[m, f"{int8[m]} ({int8[m] / bf16:.3f}x)"] + [f"{r[k]['mean']:.4g} / {r[k]['max']:.4g}"
            for k in ("k_err", "v_err", "kl", "tv", "top1", "out_err")] for m, r in out.items()]
    print(table(["scales", "B/token", "K rel err", "V rel err", "attn KL", "attn TV", "top-1 agree",
                 "attn out rel err"], rows))
    print("(mean / max over layers", args.layers, f"; {a * nq} real queries x {heads} heads, window {args.window})")
    print("wrote", write_results(args.out, {"machine": machine(), "window": args.window, "layers": args.layers,
                                            "bf16_bytes_per_token": bf16, "int8_bytes_per_token": int8,
                                            "results": out}))


if __name__ == "__main__":
    main()
