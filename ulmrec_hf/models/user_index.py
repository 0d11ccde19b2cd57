"""Modules of the personalised user index (paper §4.1): ID-query attention, RQ-VAE, collision repair."""

from collections import defaultdict
from collections.abc import Iterator

import numpy as np
import torch
from huggingface_hub import PyTorchModelHubMixin
from torch import nn
from torch.nn import functional as F


def segment_softmax(scores: torch.Tensor, segments: torch.Tensor, n_segments: int) -> torch.Tensor:
    """Softmax of `scores` within each segment id (texts of one user); torch has no ragged softmax."""
    top = torch.full((n_segments,), -torch.inf, dtype=scores.dtype, device=scores.device)
    top = top.scatter_reduce(0, segments, scores, reduce="amax", include_self=True)
    weights = torch.exp(scores - top[segments])
    totals = torch.zeros(n_segments, dtype=scores.dtype, device=scores.device).index_add(0, segments, weights)
    return weights / totals[segments]


class IdAttention(nn.Module, PyTorchModelHubMixin, library_name="ulmrec-hf"):
    """Eq. 1: alpha_i = softmax_i(e_wi^T A e_ou), x_u = sum_i alpha_i e_wi."""

    def __init__(self, dim: int, init_std: float = 0.02):
        super().__init__()
        self.A = nn.Parameter(torch.randn(dim, dim) * init_std)

    def weights(self, texts: torch.Tensor, segments: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        scores = ((texts @ self.A) * queries[segments]).sum(-1)
        return segment_softmax(scores, segments, queries.size(0))

    def forward(self, texts: torch.Tensor, segments: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        alpha = self.weights(texts, segments, queries)
        pooled = torch.zeros_like(queries).index_add(0, segments, alpha[:, None] * texts)
        return pooled


def mlp(sizes: list[int]) -> nn.Sequential:
    layers = []
    for i, (a, b) in enumerate(zip(sizes, sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class RQVAE(nn.Module, PyTorchModelHubMixin, library_name="ulmrec-hf"):
    """MLP encoder -> ResidualVQ (k-means init, commitment beta) -> MLP decoder (eq. 2-6)."""

    def __init__(self, in_dim: int, hidden: list[int], code_dim: int, levels: int, codebook_size: int,
                 commitment: float, kmeans_iters: int = 10, dead_code_threshold: float = 0.0):
        super().__init__()
        from vector_quantize_pytorch import ResidualVQ

        self.encoder = mlp([in_dim, *hidden, code_dim])
        self.decoder = mlp([code_dim, *reversed(hidden), in_dim])
        self.rq = ResidualVQ(dim=code_dim, num_quantizers=levels, codebook_size=codebook_size, kmeans_init=True,
                             kmeans_iters=kmeans_iters, commitment_weight=commitment, threshold_ema_dead_code=dead_code_threshold)

    def forward(self, x: torch.Tensor):
        z = self.encoder(x)
        quantized, codes, losses = self.rq(z)
        recon = self.decoder(quantized)
        return recon, codes, losses.sum(), z, quantized

    @torch.no_grad()
    def level_distances(self, x: torch.Tensor) -> tuple[np.ndarray, list[np.ndarray]]:
        """Codes (N, L) and, per level, squared distances (N, K) of that level's residual to each code."""
        z = self.encoder(x)
        codes = self.rq(z)[1]
        books = self.rq.codebooks  # (L, K, D)
        residual, dists = z, []
        for level in range(books.size(0)):
            dists.append(torch.cdist(residual, books[level]).pow(2).cpu().numpy())
            residual = residual - books[level][codes[:, level]]
        return codes.cpu().numpy(), dists


def candidate_codes(base: tuple, orders: list[np.ndarray]) -> Iterator[tuple]:
    """Codes near `base`: first vary the last level (nearest first); when that bucket is full,
    also vary one earlier level, from the second-to-last upwards (nearest first)."""
    last = len(base) - 1
    for c in orders[last]:
        yield base[:-1] + (int(c),)
    for level in range(last - 1, -1, -1):
        for alt in orders[level]:
            if alt == base[level]:
                continue
            prefix = base[:level] + (int(alt),) + base[level + 1:-1]
            for c in orders[last]:
                yield prefix + (int(c),)


def resolve_collisions(codes: np.ndarray, dists: list[np.ndarray], taken: set[tuple] | None = None) -> tuple[np.ndarray, int]:
    """Give every user a distinct code tuple; users whose tuple is free keep it.

    In each group sharing a tuple, the user nearest to its last-level code keeps it (unless `taken`
    already holds it, e.g. codes of existing users); the others move to the nearest free code."""
    codes = codes.copy()
    taken = set(taken or ())
    groups = defaultdict(list)
    for i, row in enumerate(map(tuple, codes.tolist())):
        groups[row].append(i)
    movers = []
    for tup in sorted(groups):
        members = sorted(groups[tup], key=lambda i: (dists[-1][i, tup[-1]], i))
        if tup in taken:
            movers.extend(members)
        else:
            taken.add(tup)
            movers.extend(members[1:])
    for i in sorted(movers):
        orders = [np.argsort(d[i], kind="stable") for d in dists]
        for tup in candidate_codes(tuple(codes[i].tolist()), orders):
            if tup not in taken:
                taken.add(tup)
                codes[i] = tup
                break
        else:
            raise RuntimeError("every code is taken: the index has fewer codes than users")
    return codes, len(movers)


def info_nce(a: torch.Tensor, b: torch.Tensor, temperature: float) -> torch.Tensor:
    logits = F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T / temperature
    return F.cross_entropy(logits, torch.arange(a.size(0), device=a.device))
