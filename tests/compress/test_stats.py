import torch

from embcompress.compress.stats import (
    StreamingMoments, explained_fraction, principal_components, rank_for_variance,
)


def test_batched_equals_at_once_and_matches_torch_cov():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1000, 3, 5, generator=gen, dtype=torch.float64) * 3 + 100.0  # large mean: stability
    once = StreamingMoments(5, groups=3)
    once.update(x)
    batched = StreamingMoments(5, groups=3)
    for chunk in torch.split(x, [1, 7, 300, 0, 92, 600]):  # uneven, including an empty batch
        batched.update(chunk)
    assert batched.count == once.count == 1000
    torch.testing.assert_close(batched.mean, once.mean)
    torch.testing.assert_close(batched.covariance(), once.covariance(), rtol=1e-10, atol=1e-10)
    for g in range(3):
        torch.testing.assert_close(once.covariance()[g], torch.cov(x[:, g].T, correction=0))
        torch.testing.assert_close(once.mean[g], x[:, g].mean(0))


def test_float32_input_accumulates_in_float64():
    x = torch.randn(64, 4)
    m = StreamingMoments(4)
    for chunk in x.split(10):
        m.update(chunk)  # (n, d) is one group
    assert m.mean.dtype == torch.float64 and m.covariance().shape == (1, 4, 4)
    torch.testing.assert_close(m.covariance()[0], torch.cov(x.double().T, correction=0))


def test_principal_components_and_rank_choice():
    cov = torch.diag(torch.tensor([1.0, 10.0, 0.1, 5.0], dtype=torch.float64))
    vals, vecs = principal_components(cov)
    torch.testing.assert_close(vals, torch.tensor([10.0, 5.0, 1.0, 0.1], dtype=torch.float64))
    assert vecs[1, 0].abs() == 1 and vecs[3, 1].abs() == 1
    assert rank_for_variance(vals, 0.9) == 2  # 15 / 16.1 = 0.93
    assert rank_for_variance(vals, 0.95) == 3
    assert rank_for_variance(vals, 1.0) == 4
    assert abs(explained_fraction(vals, 2) - 15 / 16.1) < 1e-12
