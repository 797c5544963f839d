"""Representatives: de-rotation from the log, GQA expansion, attention top-k and the proxies."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from emserve.retrieval.errors import EventTableError
from emserve.retrieval.kvlog import KVLayout, KVLog
from emserve.retrieval.representatives import event_representatives, representatives_from_keys
from emserve.server.engine.rope import RopeSpec

L, HKV, H, HD = 2, 2, 4, 8


def _rope() -> RopeSpec:
    inv = 1.0 / (10000.0 ** (torch.arange(0, HD, 2, dtype=torch.float64) / HD))
    return RopeSpec(inv_freq=inv, rot_dim=HD, head_dim=HD)


def test_derotates_log_keys_to_position_zero(tmp_path):
    rope = _rope()
    g = torch.Generator().manual_seed(0)
    t = 40
    k0 = torch.randn(t, L, HKV, HD, generator=g)  # pre-RoPE keys
    positions = torch.randint(0, 5000, (t,), generator=g)  # window positions: arbitrary, not monotonic
    log = KVLog.create(tmp_path, KVLayout(L, HKV, HD, "float32"))
    post = [rope.rotate(k0[:, layer], positions) for layer in range(L)]
    log.append(np.arange(t), positions.numpy(), post, [torch.zeros(t, HKV, HD)] * L)
    ranges = [(0, 7), (7, 8), (10, 40)]
    for proxy in ("mean", "central"):
        got = event_representatives(log, ranges, num_heads=H, rotate=rope.rotate, proxy=proxy)
        assert got.shape == (3, L, H * HD) and got.dtype == np.float32
        for i, (s, e) in enumerate(ranges):
            want = representatives_from_keys(k0[s:e], H, proxy=proxy)
            np.testing.assert_allclose(got[i], want, atol=2e-5)
    # attention scores per event
    scores = [torch.rand(L, H, e - s, generator=g) for s, e in ranges]
    got = event_representatives(log, ranges, num_heads=H, rotate=rope.rotate, token_scores=scores)
    want = representatives_from_keys(k0[10:40], H, token_scores=scores[2])
    np.testing.assert_allclose(got[2], want, atol=2e-5)


def test_mean_proxy_expands_kv_heads_to_query_heads():
    keys = torch.randn(5, L, HKV, HD)
    rep = representatives_from_keys(keys, H, proxy="mean").reshape(L, H, HD)
    for h in range(H):
        np.testing.assert_allclose(rep[:, h], keys[:, :, h // (H // HKV)].mean(0).numpy(), atol=1e-6)


def test_token_scores_pick_topk_keys_per_query_head():
    keys = torch.randn(4, 1, HKV, HD)
    scores = torch.zeros(1, H, 4)
    scores[0, 0, [1, 3]] = 1.0  # head 0 (kv 0) attended tokens 1 and 3
    scores[0, 1, [0, 2]] = 1.0  # head 1 (kv 0) tokens 0 and 2
    scores[0, 2, [2]] = 1.0  # head 2 (kv 1): token 2 and one of the ties (not checked)
    scores[0, 3, :] = torch.tensor([0.1, 0.2, 0.3, 0.4])
    rep = representatives_from_keys(keys, H, repr_topk=2, token_scores=scores).reshape(H, HD)
    np.testing.assert_allclose(rep[0], keys[[1, 3], 0, 0].mean(0).numpy(), atol=1e-6)
    np.testing.assert_allclose(rep[1], keys[[0, 2], 0, 0].mean(0).numpy(), atol=1e-6)
    np.testing.assert_allclose(rep[3], keys[[2, 3], 0, 1].mean(0).numpy(), atol=1e-6)
    # fewer tokens than repr_topk: all of them
    one = representatives_from_keys(keys[:1], H, repr_topk=4, token_scores=scores[..., :1])
    np.testing.assert_allclose(one.reshape(H, HD)[1], keys[0, 0, 0].numpy(), atol=1e-6)


def test_central_proxy_ignores_outliers():
    base = torch.tensor([1.0, 0.0])
    k = torch.stack([base, base + torch.tensor([0, 0.1]), base - torch.tensor([0, 0.1]),
                     torch.tensor([-1.0, 1.0]), base * 2])  # [5, 2]; token 3 is the outlier
    keys = k[:, None, None, :].expand(5, 1, 1, 2).contiguous()
    rep = representatives_from_keys(keys, 1, repr_topk=3, proxy="central")
    mean = k.mean(0)
    cos = (k @ mean) / (k.norm(dim=-1) * mean.norm())
    top = cos.topk(3).indices
    assert 3 not in top.tolist()
    np.testing.assert_allclose(rep[0], k[top].mean(0).numpy(), atol=1e-6)


def test_score_is_sum_over_heads():
    keys = torch.randn(6, L, HKV, HD)
    rep = representatives_from_keys(keys, H, proxy="mean")
    q = np.random.default_rng(0).standard_normal((L, H, HD)).astype(np.float32)
    per_head = np.einsum("lhd,lhd->l", q, rep.reshape(L, H, HD))
    np.testing.assert_allclose(per_head, np.einsum("ld,ld->l", q.reshape(L, -1), rep), rtol=1e-5)


def test_bad_inputs():
    keys = torch.randn(3, L, HKV, HD)
    with pytest.raises(EventTableError):
        representatives_from_keys(keys, 3)  # not a multiple of kv heads
    with pytest.raises(EventTableError):
        representatives_from_keys(keys, H, token_scores=torch.zeros(L, H, 4))
    with pytest.raises(EventTableError):
        representatives_from_keys(keys, H, proxy="median")  # type: ignore[arg-type]
    with pytest.raises(EventTableError):
        representatives_from_keys(keys[:0], H)


def test_topk_proxy_keeps_the_largest_norm_keys_separately_in_kv_layout():
    keys = torch.randn(6, L, HKV, HD)
    rep = representatives_from_keys(keys, H, repr_topk=4)  # default proxy "topk"
    assert rep.shape == (L, 4 * HKV * HD)
    for layer in range(L):
        order = torch.argsort(-keys[:, layer].reshape(6, -1).norm(dim=-1), stable=True)[:4]
        np.testing.assert_allclose(rep[layer].reshape(4, HKV, HD), keys[order, layer].numpy(), atol=1e-6)
    # shorter than repr_topk: its keys repeat (the max over vectors is unchanged)
    short = representatives_from_keys(keys[:2], H, repr_topk=4).reshape(L, 4, HKV * HD)
    np.testing.assert_allclose(short[:, 2:], short[:, :2], atol=0)
    assert {tuple(r) for r in short[0]} == {tuple(keys[i, 0].reshape(-1).numpy()) for i in range(2)}


def test_topk_score_with_folded_query_equals_expanded_key_score():
    from emserve.retrieval.queries import fold_heads

    keys = torch.randn(5, 1, HKV, HD)
    rep = representatives_from_keys(keys, H, repr_topk=5).reshape(5, HKV * HD)
    q = np.random.default_rng(1).standard_normal(H * HD).astype(np.float32)
    expanded = keys[:, 0].repeat_interleave(H // HKV, dim=1).reshape(5, -1).numpy()
    # the same 5 tokens, in norm order: compare as sets of scores
    np.testing.assert_allclose(np.sort(rep @ fold_heads(q, H // HKV, HD)), np.sort(expanded @ q), rtol=1e-4,
                               atol=1e-4)


def test_topk_batch_picks_each_events_largest_norm_keys():
    """The batched top-k path (what ``event_representatives`` runs, one event or many) picks, per event
    and layer, the keys of largest norm: short events (repeats), ties in norm (earlier token), long
    events, with no event's keys leaking into another's."""
    import torch

    from emserve.retrieval.representatives import topk_representatives

    g = torch.Generator().manual_seed(3)
    lengths = [1, 2, 3, 4, 5, 17, 1, 40, 8]
    keys = torch.randn(sum(lengths), 3, 2, 4, generator=g)
    keys[5:7] = keys[4:6].clone()  # equal norms inside an event: the earlier token first
    keys[20] = 0.0
    got = topk_representatives(keys, lengths, 4)
    off = 0
    for i, n in enumerate(lengths):
        ev = keys[off:off + n]
        for layer in range(3):
            order = torch.argsort(-ev[:, layer].reshape(n, -1).norm(dim=-1), stable=True)[: min(4, n)]
            order = order[torch.arange(4) % order.shape[0]]  # short events repeat their tokens
            np.testing.assert_array_equal(got[i, layer].reshape(4, 2, 4), ev[order, layer].numpy())
        off += n


def test_tokens_proxy_keeps_the_same_tokens_in_every_layer():
    """``"tokens"``: an event's tokens are ranked once, by key norm summed over the layers given, and
    every layer keeps those tokens' keys in that order (short events repeat, ties to the earlier token);
    the per-event function and the batched one agree."""
    from emserve.retrieval.representatives import topk_representatives

    g = torch.Generator().manual_seed(5)
    lengths = [1, 3, 6, 11]
    keys = torch.randn(sum(lengths), 3, HKV, HD, generator=g)
    keys[1, 0] *= 10  # largest in layer 0 alone: "topk" takes it there, "tokens" weighs it over the layers
    got = topk_representatives(keys, lengths, 4, aligned=True)
    off = 0
    for i, n in enumerate(lengths):
        ev = keys[off:off + n]
        total = sum(ev[:, layer].reshape(n, -1).norm(dim=-1) for layer in range(3))
        order = torch.argsort(-total, stable=True)[: min(4, n)]
        order = order[torch.arange(4) % order.shape[0]]
        for layer in range(3):
            np.testing.assert_array_equal(got[i, layer].reshape(4, HKV, HD), ev[order, layer].numpy())
        np.testing.assert_array_equal(representatives_from_keys(ev, H, repr_topk=4, proxy="tokens"), got[i])
        off += n
    # the per-layer proxy differs where one layer's norms disagree with the sum
    assert not np.array_equal(topk_representatives(keys, lengths, 4), got)
