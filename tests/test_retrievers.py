import torch

from ulmrec_hf.models.retrievers import LRULayer, RetrieverConfig, SequentialRetriever, parallel_scan, sequential_scan


def test_parallel_scan_matches_step_by_step():
    torch.manual_seed(0)
    u_re, u_im = torch.randn(3, 37, 16), torch.randn(3, 37, 16)
    log_mag, phase = -torch.rand(16) * 0.3, torch.rand(16) * 6.28
    p_re, p_im = parallel_scan(u_re, u_im, log_mag, phase)
    s_re, s_im = sequential_scan(u_re, u_im, log_mag, phase)
    assert torch.allclose(p_re, s_re, atol=1e-5) and torch.allclose(p_im, s_im, atol=1e-5)


def test_lru_ring_init_and_left_padding_invariance():
    torch.manual_seed(0)
    layer = LRULayer(8, dropout=0.0, r_min=0.8, r_max=0.99).eval()
    nu, _, gamma = torch.exp(layer.params_log)
    radius = torch.exp(-nu)
    assert radius.min() >= 0.8 - 1e-6 and radius.max() <= 0.99 + 1e-6
    assert torch.allclose(gamma, torch.sqrt(1 - radius**2))
    x = torch.randn(1, 5, 8)
    padded = torch.cat([torch.randn(1, 3, 8), x], 1)
    short = layer(x, torch.ones(1, 5, dtype=torch.bool))
    long = layer(padded, torch.tensor([[False] * 3 + [True] * 5]))
    assert torch.allclose(short, long[:, 3:], atol=1e-5)


def test_save_pretrained_round_trip(tmp_path):
    torch.manual_seed(0)
    for kind in ("lrurec", "sasrec"):
        model = SequentialRetriever(RetrieverConfig(num_items=30, kind=kind, hidden=16, ffn=32)).eval()
        model.save_pretrained(tmp_path / kind)
        again = SequentialRetriever.from_pretrained(tmp_path / kind).eval()
        assert again.config == model.config
        seqs = torch.tensor([[0, 0, 3, 4, 5], [1, 2, 3, 4, 5]])
        assert torch.equal(model.scores(model(seqs)[:, -1]), again.scores(again(seqs)[:, -1]))
