"""Streaming metrics, the geometric median and the diagnostic histograms."""
import pytest
import torch

from actserve.sae import StreamingMetrics, decoder_max_cosine_similarity, geometric_median, histogram, plot_log10_feature_density


def batches(n_batches=10, batch=500, d_in=16, seed=0):
    generator = torch.Generator().manual_seed(seed)
    # A large mean, as residual streams have: it is what makes the uncentred variance misleading.
    mean = 10 * torch.ones(d_in)
    return [mean + torch.randn(batch, d_in, generator=generator) for _ in range(n_batches)]


def test_mean_only_predictor_explains_no_variance():
    xs = batches()
    global_mean = torch.cat(xs).mean(dim=0)
    metrics = StreamingMetrics(d_sae=4)
    for x in xs:
        metrics.update(x, global_mean.expand_as(x), torch.zeros(x.shape[0], 4))
    assert metrics.compute()["explained_variance"] == pytest.approx(0.0, abs=1e-9)


def test_streaming_metrics_match_the_whole_data_at_once():
    xs = batches()
    generator = torch.Generator().manual_seed(1)
    x_hats = [x + 0.3 * torch.randn(x.shape, generator=generator) for x in xs]
    feature_acts = [torch.relu(torch.randn(x.shape[0], 8, generator=generator) - 1.0) for x in xs]
    feature_acts[0][:, 7] = 2.0  # feature 7 fires on every token of the first batch only
    feature_acts = [f.index_fill(1, torch.tensor([6]), 0.0) for f in feature_acts]  # feature 6 never fires

    metrics = StreamingMetrics(d_sae=8)
    for x, x_hat, f in zip(xs, x_hats, feature_acts):
        metrics.update(x, x_hat, f)
    result = metrics.compute()

    x, x_hat, f = (torch.cat(parts).double() for parts in (xs, x_hats, feature_acts))
    error = (x - x_hat).pow(2).sum(dim=1).mean()
    assert result["mse"] == pytest.approx(float(error))
    variance = (x - x.mean(dim=0)).pow(2).sum(dim=1).mean()
    assert result["explained_variance"] == pytest.approx(float(1 - error / variance))
    assert result["cosine_similarity"] == pytest.approx(float(torch.cosine_similarity(x, x_hat, dim=1).mean()))
    assert result["norm_ratio"] == pytest.approx(float((x_hat.norm(dim=1) / x.norm(dim=1)).mean()))
    assert result["l0"] == pytest.approx(float((f != 0).sum(dim=1).double().mean()))
    assert result["l1"] == pytest.approx(float(f.sum(dim=1).mean()))
    assert result["l1_over_l0"] == pytest.approx(result["l1"] / result["l0"])
    assert result["tokens"] == 5000
    density = (f != 0).double().mean(dim=0)
    assert result["dead_features"] == 1
    assert result["dense_features"] == int((density > 1e-2).sum())
    assert result["median_log10_density"] == pytest.approx(float(density[density > 0].log10().median()))
    torch.testing.assert_close(metrics.log10_feature_density(), torch.log10(density + 1e-10).float())
    assert metrics.log10_feature_density()[6] == pytest.approx(-10.0)


def test_geometric_median_resists_outliers():
    generator = torch.Generator().manual_seed(0)
    centre = torch.tensor([1.0, -2.0, 3.0])
    points = centre + 0.5 * torch.randn(950, 3, generator=generator)
    outliers = torch.tensor([100.0, 100.0, 100.0]) + torch.randn(50, 3, generator=generator)
    data = torch.cat([points, outliers])
    median = geometric_median(data)
    assert (median - centre).norm() < 0.2
    assert (median - centre).norm() < 0.05 * (data.double().mean(dim=0) - centre).norm()


def test_geometric_median_minimises_summed_distance():
    data = torch.randn(200, 5, generator=torch.Generator().manual_seed(3)).double()
    median = geometric_median(data)
    total = (data - median).norm(dim=1).sum()
    for direction in torch.eye(5, dtype=torch.float64):
        for step in (1e-3, -1e-3):
            assert total <= (data - median - step * direction).norm(dim=1).sum()


def test_decoder_max_cosine_similarity_excludes_self_and_finds_duplicates():
    W_dec = torch.eye(6, 6)
    W_dec[5] = torch.tensor([1.0, 1.0, 0, 0, 0, 0])  # 45 degrees from rows 0 and 1
    W_dec[4] = 3 * W_dec[3]  # a duplicate direction with another norm
    result = decoder_max_cosine_similarity(W_dec, chunk_size=4)  # chunks must not change the answer
    expected = torch.tensor([0.5**0.5, 0.5**0.5, 0.0, 1.0, 1.0, 0.5**0.5])
    torch.testing.assert_close(result, expected)


def test_histogram_and_density_plot(tmp_path):
    log10_density = torch.cat([torch.full((10,), -10.0), torch.linspace(-6, -1, 90)])
    counts, edges = histogram(log10_density, bins=20)
    assert counts.sum() == 100 and edges[0] == -10 and edges[-1] == -1
    path = tmp_path / "density.png"
    plot_log10_feature_density(log10_density, path, title="layer 8")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compute_before_update_is_an_error():
    with pytest.raises(ValueError, match="no batches"):
        StreamingMetrics(d_sae=4).compute()
