"""Sequential retrievers: LRURec (Yue et al., WSDM 2024) and SASRec (Kang & McAuley, 2018).

Both map a left-padded item-id sequence (0 = padding) to one hidden state per position; item scores
are `h @ E^T + b` with the tied item embedding `E`, computed by the caller only where needed.
LRURec is written from the paper because no maintained package provides it; complex numbers are kept
as (real, imaginary) pairs so DDP/gloo and every device handle the parameters.
"""

import math
from dataclasses import dataclass

import torch
from huggingface_hub import PyTorchModelHubMixin
from torch import nn
from torch.nn import functional as F


@dataclass
class RetrieverConfig:
    num_items: int
    kind: str = "lrurec"
    hidden: int = 64
    blocks: int = 2
    ffn: int = 256
    dropout: float = 0.5
    attn_dropout: float = 0.5
    heads: int = 2
    max_len: int = 50
    r_min: float = 0.8
    r_max: float = 0.99


def parallel_scan(u_re, u_im, log_mag, phase):
    """h_t = lambda * h_{t-1} + u_t over dim 1 in log2(L) steps (Hillis-Steele).

    lambda = exp(log_mag + i*phase), one per channel; step d adds lambda^d * h_{t-d}."""
    h_re, h_im = u_re, u_im
    length, d = u_re.size(1), 1
    while d < length:
        mag = torch.exp(log_mag * d)
        c, s = mag * torch.cos(phase * d), mag * torch.sin(phase * d)
        prev_re = F.pad(h_re[:, :-d], (0, 0, d, 0))
        prev_im = F.pad(h_im[:, :-d], (0, 0, d, 0))
        h_re, h_im = h_re + c * prev_re - s * prev_im, h_im + c * prev_im + s * prev_re
        d *= 2
    return h_re, h_im


def sequential_scan(u_re, u_im, log_mag, phase):
    """The same recurrence one step at a time (reference for tests)."""
    lam = torch.complex(torch.exp(log_mag) * torch.cos(phase), torch.exp(log_mag) * torch.sin(phase))
    u = torch.complex(u_re, u_im)
    h, out = torch.zeros_like(u[:, 0]), []
    for t in range(u.size(1)):
        h = lam * h + u[:, t]
        out.append(h)
    out = torch.stack(out, 1)
    return out.real, out.imag


class FastDropout(nn.Module):
    """Dropout from random bytes: torch's CPU bernoulli took a quarter of a training step here.

    The drop probability is rounded to a multiple of 1/256 and the kept values are rescaled exactly."""

    def __init__(self, p: float):
        super().__init__()
        self.threshold = round(p * 256)
        self.scale = 256 / (256 - self.threshold) if self.threshold < 256 else 0.0

    def forward(self, x):
        if not self.training or self.threshold == 0:
            return x
        n = x.numel()
        bits = torch.randint(-(2**63), 2**63 - 1, ((n + 7) // 8,), dtype=torch.int64, device=x.device)
        keep = bits.view(torch.uint8)[:n].view(x.shape) >= self.threshold
        return x * keep * self.scale


class LRULayer(nn.Module):
    """Linear recurrent unit: diagonal complex recurrence, ring init, gamma normalisation."""

    def __init__(self, d_model: int, dropout: float, r_min: float, r_max: float):
        super().__init__()
        state = 2 * d_model
        u1, u2 = torch.rand(state), torch.rand(state)
        nu_log = torch.log(-0.5 * torch.log(u1 * (r_max**2 - r_min**2) + r_min**2))  # |lambda| uniform on the ring
        theta_log = torch.log(u2 * 2 * math.pi)
        gamma_log = torch.log(torch.sqrt(1 - torch.exp(-torch.exp(nu_log)) ** 2))
        self.params_log = nn.Parameter(torch.stack([nu_log, theta_log, gamma_log]))
        self.in_re, self.in_im = nn.Linear(d_model, state), nn.Linear(d_model, state)
        self.out_re, self.out_im = nn.Linear(state, d_model), nn.Linear(state, d_model, bias=False)
        self.dropout = FastDropout(dropout)
        self.norm = nn.LayerNorm(d_model)

    def forward(self, x, mask):
        nu, theta, gamma = torch.exp(self.params_log)
        keep = mask.unsqueeze(-1).to(x.dtype)  # padding feeds nothing into the state
        u_re, u_im = self.in_re(x) * gamma * keep, self.in_im(x) * gamma * keep
        h_re, h_im = parallel_scan(u_re, u_im, -nu, theta)
        y = self.out_re(h_re) - self.out_im(h_im)  # Re(C h)
        return self.norm(self.dropout(y) + x)


class FeedForward(nn.Module):
    def __init__(self, d_model: int, d_ff: int, dropout: float):
        super().__init__()
        self.w1, self.w2 = nn.Linear(d_model, d_ff), nn.Linear(d_ff, d_model)
        self.dropout = FastDropout(dropout)
        self.norm = nn.LayerNorm(d_model)

    def forward(self, x):
        return self.norm(self.dropout(self.w2(self.dropout(F.gelu(self.w1(x))))) + x)


class SelfAttentionBlock(nn.Module):
    def __init__(self, d_model: int, heads: int, d_ff: int, dropout: float, attn_dropout: float):
        super().__init__()
        self.heads, self.attn_dropout = heads, attn_dropout
        self.qkv, self.proj = nn.Linear(d_model, 3 * d_model), nn.Linear(d_model, d_model)
        self.dropout, self.norm = FastDropout(dropout), nn.LayerNorm(d_model)
        self.ffn = FeedForward(d_model, d_ff, dropout)

    def forward(self, x, mask):
        b, length, d = x.shape
        q, k, v = self.qkv(x).view(b, length, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        causal = torch.ones(length, length, dtype=torch.bool, device=x.device).tril()
        allowed = causal & (mask[:, None, None, :] | torch.eye(length, dtype=torch.bool, device=x.device))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=self.attn_dropout if self.training else 0.0)
        y = self.proj(y.transpose(1, 2).reshape(b, length, d))
        return self.ffn(self.norm(self.dropout(y) + x))


class SequentialRetriever(nn.Module, PyTorchModelHubMixin, library_name="ulmrec-hf", tags=["sequential-recommendation", "ulmrec"]):
    """`save_pretrained` / `from_pretrained` write and read `config.json` (the RetrieverConfig) and `model.safetensors`."""

    def __init__(self, config: RetrieverConfig):
        super().__init__()
        self.config = config
        c = config
        self.item_emb = nn.Embedding(c.num_items + 1, c.hidden, padding_idx=0)
        self.bias = nn.Parameter(torch.zeros(c.num_items + 1))
        self.emb_norm, self.emb_dropout = nn.LayerNorm(c.hidden), FastDropout(c.dropout)
        if c.kind == "lrurec":
            self.layers = nn.ModuleList(
                nn.ModuleList([LRULayer(c.hidden, c.attn_dropout, c.r_min, c.r_max), FeedForward(c.hidden, c.ffn, c.dropout)])
                for _ in range(c.blocks))
        elif c.kind == "sasrec":
            self.pos_emb = nn.Embedding(c.max_len, c.hidden)
            self.layers = nn.ModuleList(SelfAttentionBlock(c.hidden, c.heads, c.ffn, c.dropout, c.attn_dropout) for _ in range(c.blocks))
        else:
            raise ValueError(f"unknown retriever kind {c.kind!r} (lrurec or sasrec)")
        self.reset_parameters()

    def reset_parameters(self):
        """LlamaRec's init: truncated normal (std 0.02, within +-0.04) except norms and the LRU ring params."""
        for name, p in self.named_parameters():
            if "norm" not in name and "params_log" not in name:
                nn.init.trunc_normal_(p, std=0.02, a=-0.04, b=0.04)

    def forward(self, seqs):
        """(B, L) left-padded ids -> (B, L, hidden)."""
        mask = seqs > 0
        x = self.item_emb(seqs)
        if self.config.kind == "sasrec":
            from_end = torch.arange(seqs.size(1) - 1, -1, -1, device=seqs.device).clamp(max=self.config.max_len - 1)
            x = x + self.pos_emb(from_end)  # positions count from the newest item, so padding length does not matter
        x = self.emb_norm(self.emb_dropout(x))
        for layer in self.layers:
            x = layer[1](layer[0](x, mask)) if self.config.kind == "lrurec" else layer(x, mask)
        return x

    def scores(self, hidden):
        return hidden @ self.item_emb.weight.T + self.bias
