"""Representative vectors of events: what the similarity index stores and queries are scored against.

EM-LLM (cm.py, "representative tokens"): per layer and per *query* head ``h``, take the ``repr_topk``
keys of the event that received the most attention while the event was in the local window, average
them, and concatenate the per-head means into one ``num_heads * head_dim`` vector. With GQA, query
head ``h`` reads kv head ``h // (num_heads // num_kv_heads)``. A step's query summary ``q`` (the mean
of its pre-RoPE queries, concatenated over heads) then scores an event with ``q . rep`` which is
EM-LLM's ``sum_h q_h . kbar_h``.

**``"topk"``: several vectors per event** (``repr_topk`` of them, ``vectors_per_event``):
the keys of the event's ``repr_topk`` tokens with the largest key norm in that layer (all kv heads
of the same token, ``num_kv_heads * head_dim`` values, *not* expanded to the query heads), kept
*separately*; an event then scores ``max_j q . rep_j`` (late interaction, "MaxSim"; see
``retriever``) with the query summed over each GQA group of query heads, which equals the score of
the GQA-expanded key (``sum_h q_h . k_{h // g} = sum_kv (sum_{h in kv} q_h) . k_kv``) at a third of
the storage for SmolLM2 (9 query heads, 3 kv heads). Events shorter than ``repr_topk`` repeat their tokens
(the max is unchanged). Why a max over a few keys, chosen by norm: ``docs/decisions.md``, "Representatives".

**``"tokens"`` (the default): the same tokens in every layer.** As ``"topk"``, but the ``repr_topk`` tokens are chosen
once per event, by their key norm summed over the layers computed together (a session's stored layers:
the scoring layers of a shared selection), so vector ``j`` of every layer is the same token. A shared
selection then scores an event by a *token-level* MaxSim, ``max_j sum_l s_l q_l . rep_{l,j}`` (the best
single token, its keys across the scoring layers taken together; ``retriever``) instead of
``sum_l max_j`` (the best key of each layer, possibly a different token in each). The token-level score
is one maximum inner product per token vector, which one index over token vectors can serve (#19,
``bench/results/retrieval_index.md``, "Token-level MaxSim").

Keys come from the KV log post-RoPE; they are de-rotated to position 0 (``rotate(k, -positions)``)
so that representatives and queries are both position-free. ``rotate`` is passed in (the engine's
``RopeSpec.rotate``), so this module imports nothing from the server.

Attention received per token is not reported by our engines yet. ``token_scores`` takes it when it
is available (one averaged vector per event, as EM-LLM); otherwise a **proxy** computed from the
event's own keys is used:

* ``"tokens"`` (default) and ``"topk"``: ``repr_topk`` separate vectors, the largest-norm keys (above).
* ``"mean"``: the mean of all the event's keys, per kv head. It is the uniform-weight
  limit of EM-LLM's attention-weighted top-k mean, so ``q . rep`` is the event's mean attention
  logit for ``q``: a bag-of-keys summary that does not depend on the event's length and lets every
  token (a needle included) contribute.
* ``"central"``: per kv head, the ``repr_topk`` keys with the highest cosine similarity to the
  event's mean key, averaged. Keeps the norm of typical single keys (like EM-LLM's top-k) but tends
  to pick the most generic tokens of the event.

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

ReprProxy = Literal["topk", "tokens", "mean", "central"]
REPR_PROXIES: tuple[ReprProxy, ...] = ("topk", "tokens", "mean", "central")
KEY_PROXIES: tuple[ReprProxy, ...] = ("topk", "tokens")
"""The proxies that keep ``repr_topk`` single keys per event and layer, in kv-head layout."""


def vectors_per_event(proxy: ReprProxy, repr_topk: int, *, token_scores: bool = False) -> int:
    """How many vectors one event stores per layer."""
    return repr_topk if proxy in KEY_PROXIES and not token_scores else 1


def heads_per_vector(proxy: ReprProxy, num_heads: int, num_kv_heads: int, *, token_scores: bool = False) -> int:
    """Heads a vector is laid out for: ``num_kv_heads`` for ``"topk"`` and ``"tokens"`` (queries are
    folded over GQA groups before scoring), ``num_heads`` otherwise."""
    return num_kv_heads if proxy in KEY_PROXIES and not token_scores else num_heads


def representatives_from_keys(
    keys: torch.Tensor,
    num_heads: int,
    *,
    repr_topk: int = 4,
    token_scores: torch.Tensor | None = None,
    proxy: ReprProxy = "topk",
) -> np.ndarray:
    """Representative of one event from its position-free keys.

    ``keys``: ``[T, num_layers, num_kv_heads, head_dim]`` (pre-RoPE, any float dtype).
    ``token_scores``: ``[num_layers, num_heads, T]`` attention received per token and query head,
    or None for the proxy. Returns float32 ``[num_layers, V * heads * head_dim]``, ``V`` =
    :func:`vectors_per_event`, ``heads`` = :func:`heads_per_vector` (for ``"topk"``, vector ``j`` is
    the kv-head key of the token with the ``j``-th largest key norm, ties to the earlier token; for
    ``"tokens"``, largest by the norm summed over the ``num_layers`` layers given).
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
    elif proxy in KEY_PROXIES:
        return topk_representatives(keys, [t], repr_topk, aligned=proxy == "tokens")[0]  # the batched function
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
    return rep.reshape(num_layers, -1).numpy().astype(np.float32, copy=False)


def event_representatives(
    log: KVLog,
    ranges: Sequence[tuple[int, int]],
    *,
    num_heads: int,
    rotate: RotateFn,
    repr_topk: int = 4,
    token_scores: Sequence[torch.Tensor | None] | None = None,
    proxy: ReprProxy = "topk",
    layers: Sequence[int] | None = None,
    device: str | torch.device | None = None,
) -> np.ndarray:
    """Representatives of several events read from a KV log: float32 ``[E, len(layers), V*heads*head_dim]``.

    Keys of all the events are read once per layer and de-rotated in one ``rotate`` call.
    ``token_scores[i]`` (optional, per event): ``[num_layers, num_heads, T_i]``. ``layers``: the layers
    to compute (default all; an event's representative of a layer depends on that layer's keys only,
    except with ``"tokens"``, where the tokens are chosen over all of ``layers``: pass the same layers
    every time, the table's).
    ``device``: where the keys are de-rotated and the top-k picked (a GPU: a session's open recomputes
    every event; the rows may then differ from the CPU's in the last bits of the de-rotation).
    """
    layout = log.layout
    lays = list(range(layout.num_layers)) if layers is None else [int(x) for x in layers]
    e = len(ranges)
    ts = token_scores is not None
    heads = heads_per_vector(proxy, num_heads, layout.num_kv_heads, token_scores=ts)
    dim = heads * layout.head_dim * vectors_per_event(proxy, repr_topk, token_scores=ts)
    if e == 0:
        return np.zeros((0, len(lays), dim), np.float32)
    if token_scores is not None and len(token_scores) != e:
        raise EventTableError(f"token_scores has {len(token_scores)} entries for {e} events")
    lengths = [end - start for start, end in ranges]
    if min(lengths) <= 0:
        raise EventTableError(f"empty or reversed event range in {list(ranges)}")
    contiguous = all(ranges[i][1] == ranges[i + 1][0] for i in range(e - 1))
    span = (ranges[0][0], ranges[-1][1])
    per_layer = [  # one read per layer when the events are back to back (they are, as closed)
        (log.keys(layer, *span) if contiguous else torch.cat([log.keys(layer, s, t) for s, t in ranges]))
        .to(device or "cpu").to(torch.float32) for layer in lays
    ]
    keys = torch.stack(per_layer, dim=1)  # [sumT, L, Hkv, D]
    del per_layer
    positions = torch.from_numpy((log.positions(*span) if contiguous else
                                  np.concatenate([log.positions(s, t) for s, t in ranges])).astype(np.int64))
    total = keys.shape[0]
    flat = keys.reshape(total, len(lays) * layout.num_kv_heads, layout.head_dim)
    keys = rotate(flat, -positions).reshape(keys.shape)
    if token_scores is None and proxy in KEY_PROXIES:
        return topk_representatives(keys, lengths, repr_topk, aligned=proxy == "tokens")
    out = np.empty((e, len(lays), dim), np.float32)
    offset = 0
    for i, n in enumerate(lengths):
        out[i] = representatives_from_keys(
            keys[offset:offset + n],
            num_heads,
            repr_topk=repr_topk,
            token_scores=_layers_of(None if token_scores is None else token_scores[i], layers),
            proxy=proxy,
        )
        offset += n
    return out


def _layers_of(scores: torch.Tensor | None, layers: Sequence[int] | None) -> torch.Tensor | None:
    return scores if scores is None or layers is None else scores[list(layers)]


def topk_representatives(keys: torch.Tensor, lengths: Sequence[int], repr_topk: int, *,
                         aligned: bool = False) -> np.ndarray:
    """:func:`representatives_from_keys` (``"topk"``, or ``"tokens"`` with ``aligned``; no attention
    scores) of back-to-back events at once.

    ``keys [sum(lengths), L, Hkv, D]`` (position-free); returns float32 ``[E, L, repr_topk * Hkv * D]``,
    the same rows as the per-event function (same norms, same stable order, short events repeat their
    tokens), without a Python loop over the events. ``aligned``: each token ranked by its key norms
    summed over the ``L`` layers, so every layer keeps the same tokens in the same order.
    """
    total, num_layers, num_kv, head_dim = keys.shape
    lens = torch.as_tensor(list(lengths), dtype=torch.int64)
    e = lens.shape[0]
    starts = torch.cumsum(lens, 0) - lens
    tmax = int(lens.max())
    k = keys.to(torch.float32)
    norms = k.reshape(total, num_layers, -1).norm(dim=-1)  # [T, L]
    if aligned:
        norms = norms.sum(dim=1, keepdim=True).expand(total, num_layers)
    pos = torch.arange(tmax)
    valid = pos[None, :] < lens[:, None]  # [E, Tmax]
    tok = (starts[:, None] + pos[None, :]).clamp_max(total - 1)
    padded = norms[tok.to(k.device)].masked_fill(~valid[..., None].to(k.device), float("-inf"))  # [E, Tmax, L]
    order = torch.argsort(-padded, dim=1, stable=True).cpu()  # ties to the earlier token; padding last
    kk = lens.clamp_max(repr_topk)
    slot = torch.arange(repr_topk)[None, :] % kk[:, None]  # [E, V]: repeat when the event is short
    picked = order.gather(1, slot[..., None].expand(e, repr_topk, num_layers))  # [E, V, L] token in event
    rows = (starts[:, None, None] + picked).permute(0, 2, 1)  # [E, L, V] token in the batch
    lay = torch.arange(num_layers)[None, :, None].expand_as(rows)
    rep = k[rows.to(k.device), lay.to(k.device)]  # [E, L, V, Hkv, D]
    return rep.reshape(e, num_layers, -1).cpu().numpy().astype(np.float32, copy=False)
