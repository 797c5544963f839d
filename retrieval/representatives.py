"""Representative vectors of events: what the similarity index stores and queries are scored against.

EM-LLM (cm.py, "representative tokens"): per layer and per *query* head ``h``, take the ``repr_topk``
keys of the event that received the most attention while the event was in the local window, average
them, and concatenate the per-head means into one ``num_heads * head_dim`` vector. With GQA, query
head ``h`` reads kv head ``h // (num_heads // num_kv_heads)``. A step's query summary ``q`` (the mean
of its pre-RoPE queries, concatenated over heads) then scores an event with ``q . rep`` which is
EM-LLM's ``sum_h q_h . kbar_h``.

Keys come from the KV log post-RoPE; they are de-rotated to position 0 (``rotate(k, -positions)``)
so that representatives and queries are both position-free. ``rotate`` is passed in (the engine's
``RopeSpec.rotate``), so this module imports nothing from the server.

Attention received per token is not reported by our engines yet. ``token_scores`` takes it when it
is available; otherwise a **proxy** computed from the event's own keys is used:

* ``"mean"`` (default): the mean of all the event's keys, per kv head. It is the uniform-weight
  limit of EM-LLM's attention-weighted top-k mean, so ``q . rep`` is the event's mean attention
  logit for ``q``: a bag-of-keys summary that does not depend on the event's length and lets every
  token (a needle included) contribute.
* ``"central"``: per kv head, the ``repr_topk`` keys with the highest cosine similarity to the
  event's mean key, averaged. Keeps the norm of typical single keys (like EM-LLM's top-k) but tends
  to pick the most generic tokens of the event.

Which proxy retrieves better is an empirical question (needle / passkey suite on the real model);
``RetrievalConfig.repr_proxy`` switches it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np
import torch

from emserve.retrieval.errors import EventTableError
from emserve.retrieval.kvlog import KVLog

RotateFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``rotate(x [n, heads, head_dim], delta [n]) -> x`` rotated by ``delta`` positions (RopeSpec.rotate)."""

ReprProxy = Literal["mean", "central"]
REPR_PROXIES: tuple[ReprProxy, ...] = ("mean", "central")


def representatives_from_keys(
    keys: torch.Tensor,
    num_heads: int,
    *,
    repr_topk: int = 4,
    token_scores: torch.Tensor | None = None,
    proxy: ReprProxy = "mean",
) -> np.ndarray:
    """Representative of one event from its position-free keys.

    ``keys``: ``[T, num_layers, num_kv_heads, head_dim]`` (pre-RoPE, any float dtype).
    ``token_scores``: ``[num_layers, num_heads, T]`` attention received per token and query head,
    or None for the proxy. Returns float32 ``[num_layers, num_heads * head_dim]``.
    """
    t, num_layers, num_kv, head_dim = keys.shape
    if t == 0:
        raise EventTableError("an event needs at least one token")
    if num_heads % num_kv:
        raise EventTableError(f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv}")
    group = num_heads // num_kv
    k = keys.to(torch.float32)
    kk = min(repr_topk, t)
    if token_scores is not None:
        if tuple(token_scores.shape) != (num_layers, num_heads, t):
            raise EventTableError(
                f"token_scores must be [{num_layers}, {num_heads}, {t}], got {tuple(token_scores.shape)}"
            )
        idx = token_scores.to(torch.float32).topk(kk, dim=-1).indices  # [L, H, k]
        per_head = k.repeat_interleave(group, dim=2).permute(1, 2, 0, 3)  # [L, H, T, D]
        picked = per_head.gather(2, idx[..., None].expand(num_layers, num_heads, kk, head_dim))
        rep = picked.mean(dim=2)  # [L, H, D]
    else:
        mean = k.mean(dim=0)  # [L, Hkv, D]
        if proxy == "mean":
            kv_rep = mean
        elif proxy == "central":
            direction = mean / mean.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            cos = (k * direction).sum(-1) / k.norm(dim=-1).clamp_min(1e-12)  # [T, L, Hkv]
            idx = cos.topk(kk, dim=0).indices  # [k, L, Hkv]
            kv_rep = k.gather(0, idx[..., None].expand(kk, num_layers, num_kv, head_dim)).mean(dim=0)
        else:
            raise EventTableError(f"unknown representative proxy {proxy!r}; use one of {REPR_PROXIES}")
        rep = kv_rep.repeat_interleave(group, dim=1)  # [L, H, D]
    return rep.reshape(num_layers, num_heads * head_dim).numpy().astype(np.float32, copy=False)


def event_representatives(
    log: KVLog,
    ranges: Sequence[tuple[int, int]],
    *,
    num_heads: int,
    rotate: RotateFn,
    repr_topk: int = 4,
    token_scores: Sequence[torch.Tensor | None] | None = None,
    proxy: ReprProxy = "mean",
) -> np.ndarray:
    """Representatives of several events read from a KV log: float32 ``[E, num_layers, num_heads*head_dim]``.

    Keys of all the events are read once per layer and de-rotated in one ``rotate`` call.
    ``token_scores[i]`` (optional, per event): ``[num_layers, num_heads, T_i]``.
    """
    layout = log.layout
    e = len(ranges)
    dim = num_heads * layout.head_dim
    if e == 0:
        return np.zeros((0, layout.num_layers, dim), np.float32)
    if token_scores is not None and len(token_scores) != e:
        raise EventTableError(f"token_scores has {len(token_scores)} entries for {e} events")
    lengths = [end - start for start, end in ranges]
    if min(lengths) <= 0:
        raise EventTableError(f"empty or reversed event range in {list(ranges)}")
    per_layer = [
        torch.cat([log.keys(layer, s, t) for s, t in ranges]).to(torch.float32)
        for layer in range(layout.num_layers)
    ]
    keys = torch.stack(per_layer, dim=1)  # [sumT, L, Hkv, D]
    del per_layer
    positions = torch.from_numpy(np.concatenate([log.positions(s, t) for s, t in ranges]).astype(np.int64))
    total = keys.shape[0]
    flat = keys.reshape(total, layout.num_layers * layout.num_kv_heads, layout.head_dim)
    keys = rotate(flat, -positions).reshape(keys.shape)
    out = np.empty((e, layout.num_layers, dim), np.float32)
    offset = 0
    for i, n in enumerate(lengths):
        out[i] = representatives_from_keys(
            keys[offset:offset + n],
            num_heads,
            repr_topk=repr_topk,
            token_scores=None if token_scores is None else token_scores[i],
            proxy=proxy,
        )
        offset += n
    return out
