import numpy as np
import torch

from ulmrec_hf.models.user_index import RQVAE, IdAttention, resolve_collisions, segment_softmax


def test_attention_weights_sum_to_one_and_depend_on_the_id():
    torch.manual_seed(0)
    attention = IdAttention(16, init_std=0.5)
    texts = torch.randn(3, 16).repeat(2, 1)  # two users with the same three reviews
    segments = torch.tensor([0, 0, 0, 1, 1, 1])
    queries = torch.randn(2, 16)
    alpha = attention.weights(texts, segments, queries)
    assert torch.allclose(alpha.view(2, 3).sum(1), torch.ones(2))
    pooled = attention(texts, segments, queries)
    assert not torch.allclose(pooled[0], pooled[1], atol=1e-4)


def test_segment_softmax_matches_dense():
    scores = torch.randn(7)
    segments = torch.tensor([0, 0, 1, 1, 1, 2, 2])
    out = segment_softmax(scores, segments, 3)
    for idx in ([0, 1], [2, 3, 4], [5, 6]):
        assert torch.allclose(out[idx], torch.softmax(scores[idx], 0))


def test_resolve_collisions_overflow_is_deterministic():
    k, n = 4, 14
    codes = np.zeros((n, 3), dtype=np.int64)  # 14 users on (0, 0, 0): the (0, 0) bucket holds only 4, level 1 = 0 holds 16
    rng = np.random.default_rng(0)
    dists = [rng.random((n, k)) for _ in range(3)]
    fixed, moved = resolve_collisions(codes, dists)
    again, _ = resolve_collisions(codes, dists)
    assert (fixed == again).all() and moved == n - 1
    assert len({tuple(c) for c in fixed.tolist()}) == n
    keeper = int(np.argmin(dists[2][:, 0]))
    assert tuple(fixed[keeper]) == (0, 0, 0)
    assert sum(tuple(c[:2]) == (0, 0) for c in fixed.tolist()) == k  # the bucket is full, the rest moved level 2
    assert all(c[0] == 0 for c in fixed.tolist())  # level 1 untouched while level-2 buckets are free


def test_resolve_collisions_respects_taken_codes():
    codes = np.array([[1, 1], [1, 1], [2, 0]])
    dists = [np.zeros((3, 4)), np.tile(np.arange(4.0), (3, 1))]
    fixed, _ = resolve_collisions(codes, dists, taken={(1, 1), (1, 0)})
    assert {tuple(c) for c in fixed.tolist()}.isdisjoint({(1, 1), (1, 0)}) and tuple(fixed[2]) == (2, 0)


def test_quantiser_save_pretrained_round_trip(tmp_path):
    torch.manual_seed(0)
    model = RQVAE(16, [32], 8, 3, 16, 0.25, 5, 2.0)
    x = torch.randn(100, 16)
    model(x)
    model.eval().save_pretrained(tmp_path)
    again = RQVAE.from_pretrained(tmp_path).eval()
    codes, dists = model.level_distances(x)
    codes2, dists2 = again.level_distances(x)
    assert (codes == codes2).all() and all(np.array_equal(a, b) for a, b in zip(dists, dists2))
