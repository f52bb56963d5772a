"""Token pyramid quantizer: positions, residual/mean quantization, chunked search, semantic loss."""

from __future__ import annotations

import pytest
import torch

from napari_langmamba.errors import ConfigError
from napari_langmamba.models.quantizer import (
    PositionPools,
    PyramidQuantizer,
    nearest_tokens,
    pyramid_positions,
    pyramid_semantic_loss,
)

torch.set_num_threads(1)


def _as_lists(positions):
    return [(r.tolist(), c.tolist()) for r, c in positions]


def test_positions_on_32x32_match_the_paper():
    (r1, c1), (r2, c2), (r3, c3) = _as_lists(pyramid_positions(32, 32))
    assert r1 == c1 == [7, 23]
    assert r2 == c2 == [3, 7, 11, 15, 19, 23, 27, 31]
    assert r3 == c3 == list(range(32))


def test_positions_other_sizes():
    (r1, _), (r2, _), (r3, _) = _as_lists(pyramid_positions(16, 16))
    assert (r1, r2, r3) == ([7], [3, 7, 11, 15], list(range(16)))
    (r1, c1), (r2, c2), _ = _as_lists(pyramid_positions(64, 16))
    assert r1 == [7, 23, 39, 55] and c1 == [7]
    assert len(r2) == 16 and c2 == [3, 7, 11, 15]
    # too short for a layer: it takes the layer-below position nearest the centre
    (r1, _), (r2, _), _ = _as_lists(pyramid_positions(4, 4))
    assert (r1, r2) == ([3], [3])
    (r1, _), (r2, _), (r3, _) = _as_lists(pyramid_positions(3, 3))
    assert (r1, r2, r3) == ([1], [1], [0, 1, 2])
    assert _as_lists(pyramid_positions(1, 1)) == [([0], [0])] * 3
    with pytest.raises(ConfigError):
        pyramid_positions(0, 4)


@pytest.mark.parametrize("size", range(1, 70))
def test_positions_nested_and_nonempty(size):
    layers = [r.tolist() for r, _ in pyramid_positions(size, size)]
    assert all(layer and layer == sorted(set(layer)) for layer in layers)
    assert set(layers[0]) <= set(layers[1]) <= set(layers[2]) == set(range(size))


def test_nearest_tokens_chunked_equals_brute_force():
    g = torch.Generator().manual_seed(1)
    table = torch.randn(300, 12, generator=g)
    x = torch.randn(97, 12, generator=g)
    ids, dist = nearest_tokens(x, table, block_elements=1000)  # blocks of 3 positions
    ref = torch.cdist(x.double(), table.double()).pow(2)
    assert torch.equal(ids, ref.argmin(1))
    assert torch.allclose(dist.double(), ref.min(1).values, atol=1e-4)


def test_quantizer_exact_on_codebook_vectors():
    g = torch.Generator().manual_seed(0)
    table = torch.randn(40, 8, generator=g)
    target_ids = torch.randint(0, 40, (2, 32, 32), generator=g)
    z = table[target_ids].permute(0, 3, 1, 2).contiguous()  # (b, d, h, w) made of codebook rows
    out = PyramidQuantizer(table, beta=0.25)(z)
    assert [tuple(i.shape) for i in out.ids] == [(2, 2, 2), (2, 8, 8), (2, 32, 32)]
    for ids, (rows, cols) in zip(out.ids, out.positions, strict=True):
        assert torch.equal(ids, target_ids[:, rows[:, None], cols[None, :]])
    assert torch.allclose(out.z_q, z, atol=1e-5)
    assert all(float(d.max()) < 1e-4 for d in out.distances)  # |x|^2 - 2x.e + |e|^2 cancellation
    assert float(out.commitment_loss) < 1e-10


def test_quantized_latent_is_mean_of_layer_embeddings_and_residuals():
    g = torch.Generator().manual_seed(3)
    table = torch.randn(64, 6, generator=g)
    z = torch.randn(1, 6, 16, 16, generator=g, requires_grad=True)
    quantizer = PyramidQuantizer(table)
    out = quantizer(z)
    e = [table[i[0]] for i in out.ids]  # per layer (rows, cols, d)
    # position (7, 7): all three layers; (3, 3): layers 2 and 3; (0, 0): layer 3 only
    zq = out.z_q.detach()[0].permute(1, 2, 0)
    assert torch.allclose(zq[7, 7], (e[0][0, 0] + e[1][1, 1] + e[2][7, 7]) / 3, atol=1e-6)
    assert torch.allclose(zq[3, 3], (e[1][0, 0] + e[2][3, 3]) / 2, atol=1e-6)
    assert torch.allclose(zq[0, 0], e[2][0, 0], atol=1e-6)
    # residuals: layer 2 at (7, 7) quantizes 2 z - e1; layer 3 there 3 z - e1 - e2
    zz = z.detach()[0, :, 7, 7]
    assert torch.allclose(out.layer_embeddings[1][0, :, 1, 1].detach(), 2 * zz - e[0][0, 0], atol=1e-6)
    assert torch.allclose(out.layer_embeddings[2][0, :, 7, 7].detach(), 3 * zz - e[0][0, 0] - e[1][1, 1], atol=1e-6)
    # each token is the nearest row to its residual
    r2 = out.layer_embeddings[2][0].detach().permute(1, 2, 0).reshape(-1, 6)
    assert torch.equal(out.ids[2][0].reshape(-1), torch.cdist(r2, table).argmin(1))
    # straight-through: d z_q / d z is the identity
    out.z_q.sum().backward()
    assert torch.equal(z.grad, torch.ones_like(z))


def test_commitment_loss_uses_beta_and_reaches_latent():
    table = torch.randn(20, 4)
    z = torch.randn(1, 4, 8, 8, requires_grad=True)
    out1 = PyramidQuantizer(table, beta=1.0)(z)
    out2 = PyramidQuantizer(table, beta=0.3)(z)
    assert torch.allclose(out2.commitment_loss, 0.3 * out1.commitment_loss)
    out1.commitment_loss.backward()
    assert z.grad.abs().sum() > 0


def _naive_semantic(layer_embeddings, table, pools):
    losses = []
    for emb, pool in zip(layer_embeddings, pools, strict=True):
        b, d = emb.shape[:2]
        x = emb.permute(0, 2, 3, 1).reshape(b, -1, d)
        logits = -((x.unsqueeze(2) - table.view(1, 1, *table.shape)) ** 2).sum(-1)  # (b, P, n)
        logp = logits - logits.logsumexp(-1, keepdim=True)
        per_item = [-(logp[i][:, pool[i]]).mean(1) for i in range(b)]
        losses.append(torch.stack(per_item).mean())
    return torch.stack(losses).mean()


def test_semantic_loss_matches_naive_reference_values_and_gradients():
    g = torch.Generator().manual_seed(5)
    table = torch.randn(50, 5, generator=g, dtype=torch.float64)
    embs = [torch.randn(2, 5, r, r, generator=g, dtype=torch.float64, requires_grad=True) for r in (1, 2, 4)]
    pools = []
    for _ in range(3):
        mask = torch.zeros(2, 50, dtype=torch.bool)
        mask[0, [1, 4, 9]] = True
        mask[1, [2, 30]] = True
        pools.append(mask)
    loss = pyramid_semantic_loss(embs, table, pools, block_elements=100)  # blocks of 2 positions
    ref = _naive_semantic(embs, table, pools)
    assert torch.allclose(loss, ref, rtol=1e-10)
    grads = torch.autograd.grad(loss, embs)
    ref_grads = torch.autograd.grad(_naive_semantic(embs, table, pools), embs)
    for a, b in zip(grads, ref_grads, strict=True):
        assert torch.allclose(a, b, rtol=1e-8, atol=1e-12)


def test_any_word_target_is_minus_the_log_probability_of_the_whole_pool():
    g = torch.Generator().manual_seed(11)
    table = torch.randn(60, 6, generator=g, dtype=torch.float64)
    emb = torch.randn(2, 6, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    mask = torch.zeros(2, 60, dtype=torch.bool)
    mask[0, [1, 4, 9]] = True
    mask[1, [2, 30, 31, 59]] = True
    # per-position pools: three pools (one of them empty), position (0, 1, 1) without a pool
    pool_ids = torch.tensor([[5, 7, -1], [0, 1, 2], [-1, -1, -1]])
    index = torch.randint(0, 3, (2, 3, 3), generator=g)
    index[0, 1, 1] = -1
    positions = PositionPools(pool_ids, index)

    def naive(x, members):  # members: per position (row-major) its ids, or None
        flat = x.permute(0, 2, 3, 1).reshape(-1, 6)
        logits = -((flat.unsqueeze(1) - table.unsqueeze(0)) ** 2).sum(-1)
        terms = [logits[i].logsumexp(0) - logits[i, ids].logsumexp(0) for i, ids in enumerate(members) if ids]
        return torch.stack(terms).mean()

    per_image = [mask[i].nonzero().flatten().tolist() for i in range(2) for _ in range(9)]
    lists = {0: [5, 7], 1: [0, 1, 2], 2: None, -1: None}
    per_position = [lists[int(k)] for k in index.flatten()]
    for pools, members in (([mask], per_image), ([positions], per_position)):
        loss = pyramid_semantic_loss([emb], table, pools, target="any", block_elements=120)  # blocks of 2
        ref = naive(emb, members)
        assert torch.allclose(loss, ref, rtol=1e-10)
        (grad,) = torch.autograd.grad(loss, emb)
        (ref_grad,) = torch.autograd.grad(ref, emb)
        assert torch.allclose(grad, ref_grad, rtol=1e-8, atol=1e-12)
    # a position next to one pool word: "any" is near 0 there, "uniform" is not (the pool's centre is far)
    near = table[2].view(1, 6, 1, 1).clone()
    one = torch.zeros(1, 60, dtype=torch.bool)
    one[0, [2, 30, 59]] = True
    assert float(pyramid_semantic_loss([near], table, [one], target="any")) < \
        float(pyramid_semantic_loss([near], table, [one]))
    with pytest.raises(ConfigError, match="target"):
        pyramid_semantic_loss([emb], table, [mask], target="nearest")


def test_semantic_loss_falls_as_embeddings_move_toward_pool():
    g = torch.Generator().manual_seed(7)
    table = torch.randn(200, 16, generator=g)
    pool = torch.zeros(200, dtype=torch.bool)
    pool[[3, 50, 120]] = True
    x0 = torch.randn(1, 16, 4, 4, generator=g)
    centre = table[pool].mean(0).view(1, 16, 1, 1)
    # straight moves from random embeddings to the pool's centre
    path = [float(pyramid_semantic_loss([(1 - t) * x0 + t * centre], table, [pool])) for t in (0, 0.25, 0.5, 0.75, 1)]
    assert all(b < a for a, b in zip(path, path[1:], strict=False))
    assert path[-1] < 0.25 * path[0]

    def pool_distance(x):  # mean distance to the pool's nearest member
        flat = x.detach().permute(0, 2, 3, 1).reshape(-1, 16)
        return torch.cdist(flat, table[pool]).min(1).values.mean()

    # and gradient descent on the loss moves them there
    x = x0.clone().requires_grad_(True)
    optimizer = torch.optim.SGD([x], lr=0.2)
    history = []
    for _ in range(30):
        optimizer.zero_grad()
        loss = pyramid_semantic_loss([x], table, [pool])
        loss.backward()
        optimizer.step()
        history.append(loss.item())
    assert all(b <= a + 1e-6 for a, b in zip(history, history[1:], strict=False))
    assert history[-1] < 0.5 * history[0]
    assert pool_distance(x) < 0.85 * pool_distance(x0)


def test_semantic_loss_skips_missing_pools_and_keeps_graph():
    table = torch.randn(10, 3)
    x = torch.randn(2, 3, 2, 2, requires_grad=True)
    empty = torch.zeros(2, 10, dtype=torch.bool)
    loss = pyramid_semantic_loss([x, x], table, [None, empty])
    assert float(loss) == 0.0
    loss.backward()
    assert torch.equal(x.grad, torch.zeros_like(x))
    # a pool for only one of two images: only that image counts
    half = empty.clone()
    half[1, 4] = True
    both = pyramid_semantic_loss([x], table, [half])
    only = pyramid_semantic_loss([x[1:]], table, [half[1:]])
    assert torch.allclose(both, only)
    with pytest.raises(ConfigError):
        pyramid_semantic_loss([x], table, [torch.ones(3, dtype=torch.bool)])


def _naive_position_semantic(emb, table, pool_lists):
    """Reference: per position (row-major over b, rows, cols) the pool of ids or None."""
    d = emb.shape[1]
    x = emb.permute(0, 2, 3, 1).reshape(-1, d)
    logits = -((x.unsqueeze(1) - table.unsqueeze(0)) ** 2).sum(-1)  # (P, n)
    logp = logits - logits.logsumexp(-1, keepdim=True)
    terms = [-logp[i, ids].mean() for i, ids in enumerate(pool_lists) if ids]
    return torch.stack(terms).mean()


def test_position_pools_match_naive_reference_values_and_gradients():
    g = torch.Generator().manual_seed(11)
    table = torch.randn(40, 6, generator=g, dtype=torch.float64)
    emb = torch.randn(2, 6, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    pool_ids = torch.tensor([[1, 5, 7, -1], [20, -1, -1, -1], [3, 4, 30, 39], [-1, -1, -1, -1]])
    index = torch.randint(-1, 4, (2, 3, 3), generator=g)
    index[0, 0, 0] = 2  # at least one position with a pool
    members = [[i for i in row if i >= 0] for row in pool_ids.tolist()]
    pool_lists = [members[k] if k >= 0 else [] for k in index.reshape(-1).tolist()]
    loss = pyramid_semantic_loss([emb], table, [PositionPools(pool_ids, index)], block_elements=80)  # 2 / block
    ref = _naive_position_semantic(emb, table, pool_lists)
    assert torch.allclose(loss, ref, rtol=1e-10)
    (grad,) = torch.autograd.grad(loss, emb)
    (ref_grad,) = torch.autograd.grad(_naive_position_semantic(emb, table, pool_lists), emb)
    assert torch.allclose(grad, ref_grad, rtol=1e-8, atol=1e-12)
    # positions without a pool (index -1 or the empty pool 3) get no gradient
    silent = ((index < 0) | (index == 3)).unsqueeze(1).expand_as(grad)
    assert torch.equal(grad[silent], torch.zeros_like(grad[silent])) and grad[~silent].abs().sum() > 0


def test_pool_balance_weighs_each_position_by_its_pool_frequency():
    g = torch.Generator().manual_seed(13)
    table = torch.randn(20, 5, generator=g, dtype=torch.float64)
    emb = torch.randn(1, 5, 2, 2, generator=g, dtype=torch.float64, requires_grad=True)
    pool_ids = torch.tensor([[1, 2], [7, -1]])
    index = torch.tensor([[[0, 0], [0, 1]]])  # three positions share pool 0, one has pool 1
    pools = [PositionPools(pool_ids, index)]
    lists = [[1, 2], [1, 2], [1, 2], [7]]
    per_position = torch.stack([_naive_position_semantic(emb[..., i // 2, i % 2, None, None], table, [ids])
                                for i, ids in enumerate(lists)])
    plain = pyramid_semantic_loss([emb], table, pools)
    assert torch.allclose(plain, per_position.mean(), rtol=1e-10)
    assert torch.allclose(pyramid_semantic_loss([emb], table, pools, balance=0.0), plain, rtol=1e-12)
    # balance 1: each pool counts once, whatever the number of positions holding it
    even = pyramid_semantic_loss([emb], table, pools, balance=1.0)
    assert torch.allclose(even, (per_position[:3].mean() + per_position[3]) / 2, rtol=1e-10)
    half = pyramid_semantic_loss([emb], table, pools, balance=0.5)
    w = torch.tensor([3 ** -0.5] * 3 + [1.0], dtype=torch.float64)
    assert torch.allclose(half, (per_position * w).sum() / w.sum(), rtol=1e-10)
    (grad,) = torch.autograd.grad(even, emb)
    (ref,) = torch.autograd.grad((per_position[:3].mean() + per_position[3]) / 2, emb)
    assert torch.allclose(grad, ref, rtol=1e-8, atol=1e-12)
    # balance groups (e.g. the majority tissue class) are counted instead of the pools: positions
    # 0 and 3 form one group, 1 and 2 another, so at balance 1 each pair weighs half
    grouped = [PositionPools(pool_ids, index, torch.tensor([[[0, 5], [5, 0]]]))]
    by_group = pyramid_semantic_loss([emb], table, grouped, balance=1.0)
    assert torch.allclose(by_group, (per_position[[0, 3]].mean() + per_position[[1, 2]].mean()) / 2, rtol=1e-10)
    assert torch.allclose(pyramid_semantic_loss([emb], table, grouped), plain, rtol=1e-12)  # no balance: unused
    with pytest.raises(ConfigError, match="Balance groups"):
        pyramid_semantic_loss([emb], table, [PositionPools(pool_ids, index, torch.tensor([[[0, -1], [5, 0]]]))],
                              balance=1.0)


def test_position_pools_reduce_to_per_image_pools():
    g = torch.Generator().manual_seed(12)
    table = torch.randn(30, 4, generator=g, dtype=torch.float64)
    embs = [torch.randn(3, 4, r, r, generator=g, dtype=torch.float64) for r in (1, 2, 4)]
    mask = torch.zeros(3, 30, dtype=torch.bool)
    mask[0, [2, 9]] = True
    mask[2, [0, 1, 29]] = True  # image 1 has no pool
    pool_ids = torch.tensor([[2, 9, -1], [-1, -1, -1], [0, 1, 29]])
    per_position = [PositionPools(pool_ids, torch.arange(3).view(3, 1, 1).expand(3, *e.shape[2:])) for e in embs]
    a = pyramid_semantic_loss(embs, table, [mask] * 3)
    b = pyramid_semantic_loss(embs, table, per_position)
    assert torch.allclose(a, b, rtol=1e-12) and float(a) > 0


def test_position_pools_are_checked():
    table = torch.randn(10, 3)
    x = torch.randn(1, 3, 2, 2, requires_grad=True)
    good_ids = torch.tensor([[0, 1]])
    with pytest.raises(ConfigError, match="index"):
        pyramid_semantic_loss([x], table, [PositionPools(good_ids, torch.zeros(1, 3, 3, dtype=torch.long))])
    with pytest.raises(ConfigError, match="token ids"):
        pyramid_semantic_loss([x], table, [PositionPools(torch.tensor([[0, 10]]), torch.zeros(1, 2, 2, dtype=torch.long))])
    with pytest.raises(ConfigError, match="names pool"):
        pyramid_semantic_loss([x], table, [PositionPools(good_ids, torch.ones(1, 2, 2, dtype=torch.long))])
    none = PositionPools(good_ids, torch.full((1, 2, 2), -1, dtype=torch.long))
    assert float(pyramid_semantic_loss([x], table, [none])) == 0.0


def test_tiny_langae_tokens_move_toward_planted_region_pools():
    from napari_langmamba.models.codebook import load_codebook
    from napari_langmamba.models.langae import LangAE, LangAEConfig

    torch.manual_seed(0)
    codebook = load_codebook("random:64x16")
    model = LangAE(LangAEConfig.preset("tiny", codebook_dim=16), codebook=codebook)
    x = torch.rand(2, 1, 64, 64)
    # planted pools: the left half of every image wants tokens {3, 17}, the right half {40, 41, 42}
    pool_ids = torch.tensor([[3, 17, -1], [40, 41, 42]])
    left, right = {3, 17}, {40, 41, 42}

    def pools_for(pyramid):
        out = []
        for rows, cols in pyramid.positions:
            side = (cols >= 2).long()  # latent 4 x 4: columns 0-1 left, 2-3 right
            out.append(PositionPools(pool_ids, side.view(1, 1, -1).expand(2, len(rows), len(cols)).contiguous()))
        return out

    def hit_rate(pyramid):
        ids = pyramid.ids[2]  # layer 3: every latent position
        wanted = [left, left, right, right]
        hits = [int(ids[b, r, c]) in wanted[c] for b in range(2) for r in range(4) for c in range(4)]
        return sum(hits) / len(hits)

    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    _, first = model(x)
    before = hit_rate(first)
    for _ in range(12):
        _, pyramid = model(x)
        loss = pyramid_semantic_loss(pyramid.layer_embeddings, model.quantizer.codebook, pools_for(pyramid))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        _, after_pyramid = model(x)
    after = hit_rate(after_pyramid)
    assert before <= 0.25 and after >= 0.75, (before, after)


def test_pool_restricted_tokens_are_the_nearest_of_their_pool_and_the_rest_search_everything():
    from napari_langmamba.models.quantizer import nearest_pool_tokens

    g = torch.Generator().manual_seed(5)
    table = torch.randn(50, 6, generator=g)
    x = torch.randn(40, 6, generator=g)
    pool_ids = torch.tensor([[3, 7, 11, -1], [20, 21, 22, 23], [-1, -1, -1, -1]])
    index = torch.tensor([0] * 15 + [1] * 15 + [2] * 5 + [-1] * 5)
    ids, dist = nearest_pool_tokens(x, table, pool_ids, index)
    d2 = torch.cdist(x.double(), table.double()).pow(2)
    for i in range(40):
        allowed = [3, 7, 11] if i < 15 else [20, 21, 22, 23] if i < 30 else list(range(50))  # empty pool, -1: all
        best = allowed[int(d2[i, allowed].argmin())]
        assert int(ids[i]) == best and abs(float(dist[i]) - float(d2[i, best])) < 1e-4

    # through the quantizer: every layer's tokens come from its positions' pools
    z = torch.randn(2, 6, 8, 8, generator=g)
    quantizer = PyramidQuantizer(table)
    free = quantizer(z)
    pools = [PositionPools(pool_ids, torch.zeros_like(i)) for i in free.ids]
    pools[2] = PositionPools(pool_ids, torch.ones_like(free.ids[2]))
    out = quantizer(z, pools=pools)
    assert set(out.ids[0].unique().tolist()) <= {3, 7, 11} and set(out.ids[1].unique().tolist()) <= {3, 7, 11}
    assert set(out.ids[2].unique().tolist()) <= {20, 21, 22, 23}
    assert not set(free.ids[2].unique().tolist()) <= {20, 21, 22, 23}  # unrestricted, they were others
    with pytest.raises(ConfigError, match="one pool set per pyramid layer"):
        quantizer(z, pools=pools[:2])
    with pytest.raises(ConfigError, match="positions"):
        quantizer(z, pools=[pools[0], pools[1], pools[1]])
