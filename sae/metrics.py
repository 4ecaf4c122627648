"""Evaluation metrics, accumulated batch by batch so that an evaluator can stream millions of tokens.

    metrics = StreamingMetrics(d_sae=sae.cfg.d_sae, device=x.device)
    for x in batches:
        f = sae.encode(x)
        metrics.update(x, sae.decode(f), f)
    metrics.compute()   # {"explained_variance": ..., "l0": ..., "dead_features": ...}

Sums are kept in float64: the variance below is a difference of two large, nearly equal numbers
when activations have a large mean, as residual streams do.
"""
from pathlib import Path

import torch
from torch import Tensor

DENSE_THRESHOLD = 1e-2  # features firing on more than 1 token in 100 count as dense (seed 000)
DENSITY_EPS = 1e-10  # log10(density + eps): features that never fired sit at -10


class StreamingMetrics:
    """Reconstruction, sparsity and firing-frequency statistics over every batch fed to `update`.

    The window for "dead" is everything fed so far: a dead feature never fired in it.
    """

    def __init__(self, d_sae: int, device: str | torch.device = "cpu"):
        self.n_tokens = 0
        self.sum_x = None  # [d_in], allocated on the first batch
        self.sum_sq_norm = torch.zeros((), dtype=torch.float64, device=device)
        self.sum_sq_error = torch.zeros((), dtype=torch.float64, device=device)
        self.sum_cosine = torch.zeros((), dtype=torch.float64, device=device)
        self.sum_norm_ratio = torch.zeros((), dtype=torch.float64, device=device)
        self.sum_l0 = torch.zeros((), dtype=torch.float64, device=device)
        self.sum_l1 = torch.zeros((), dtype=torch.float64, device=device)
        self.fire_counts = torch.zeros(d_sae, dtype=torch.float64, device=device)

    @torch.no_grad()
    def update(self, x: Tensor, x_hat: Tensor, feature_acts: Tensor) -> None:
        """Add a batch: inputs and reconstructions [..., d_in], feature activations [..., d_sae]."""
        x = x.reshape(-1, x.shape[-1]).to(self.fire_counts.device, torch.float64)
        x_hat = x_hat.reshape(x.shape).to(x)
        active = feature_acts.reshape(x.shape[0], -1).to(self.fire_counts.device) != 0
        x_norm, x_hat_norm = x.norm(dim=-1), x_hat.norm(dim=-1)

        self.n_tokens += x.shape[0]
        self.sum_x = x.sum(dim=0) if self.sum_x is None else self.sum_x + x.sum(dim=0)
        self.sum_sq_norm += x_norm.pow(2).sum()
        self.sum_sq_error += (x - x_hat).pow(2).sum()
        self.sum_cosine += ((x * x_hat).sum(dim=-1) / (x_norm * x_hat_norm).clamp(min=1e-12)).sum()
        self.sum_norm_ratio += (x_hat_norm / x_norm.clamp(min=1e-12)).sum()
        self.sum_l0 += active.sum()
        self.sum_l1 += feature_acts.abs().sum(dtype=torch.float64).to(self.sum_l1.device)
        self.fire_counts += active.sum(dim=0)

    def compute(self) -> dict[str, float]:
        """The metrics over all tokens so far.

        mse: E||x - x_hat||^2 per token (summed over d_in, as the training loss).
        explained_variance: 1 - E||x - x_hat||^2 / (E||x||^2 - ||E x||^2), centred, so that a
        predictor outputting the mean scores 0 (the uncentred form gave it ~0.93; SAELens #659).
        norm_ratio: mean ||x_hat|| / ||x||, below 1 under feature suppression (002).
        l1_over_l0: mean L1 / mean L0, 1 when active features have unit activations (002).
        median_log10_density: the median over features that fired of log10(firing frequency),
        where a density histogram's mass sits (mean density is L0 / d_sae).
        """
        if self.n_tokens == 0:
            raise ValueError("no batches fed to StreamingMetrics.update yet")
        n = self.n_tokens
        mean_x = self.sum_x / n
        total_variance = self.sum_sq_norm / n - mean_x.pow(2).sum()
        mse = self.sum_sq_error / n
        density = self.fire_counts / n
        l0, l1 = self.sum_l0 / n, self.sum_l1 / n
        return {
            "tokens": float(n),
            "mse": float(mse),
            "explained_variance": float(1 - mse / total_variance) if total_variance > 0 else float("nan"),
            "cosine_similarity": float(self.sum_cosine / n),
            "norm_ratio": float(self.sum_norm_ratio / n),
            "l0": float(l0),
            "l1": float(l1),
            "l1_over_l0": float(l1 / l0) if l0 > 0 else float("nan"),
            "dead_features": float((self.fire_counts == 0).sum()),
            "dense_features": float((density > DENSE_THRESHOLD).sum()),
            "median_log10_density": float(density[density > 0].log10().median()) if (density > 0).any() else float("nan"),
        }

    def log10_feature_density(self) -> Tensor:
        """[d_sae] float32 on CPU: log10 of each feature's firing frequency (+1e-10), the
        quantity SAELens stores in sparsity.safetensors."""
        return torch.log10(self.fire_counts / max(self.n_tokens, 1) + DENSITY_EPS).float().cpu()


@torch.no_grad()
def decoder_max_cosine_similarity(W_dec: Tensor, chunk_size: int = 4096) -> Tensor:
    """[d_sae]: for every decoder row (feature direction), its largest cosine similarity with any
    OTHER row (seed 003: trained dictionaries are far less orthogonal than random ones).
    Computed in row chunks: the full d_sae x d_sae matrix would not fit for large dictionaries."""
    directions = W_dec / W_dec.norm(dim=1, keepdim=True).clamp(min=1e-12)
    result = torch.empty(W_dec.shape[0], dtype=directions.dtype, device=W_dec.device)
    for start in range(0, W_dec.shape[0], chunk_size):
        cosines = directions[start : start + chunk_size] @ directions.T
        rows = torch.arange(cosines.shape[0], device=W_dec.device)
        cosines[rows, rows + start] = float("-inf")  # a row's similarity with itself
        result[start : start + chunk_size] = cosines.amax(dim=1)
    return result.cpu()


def histogram(values: Tensor, bins: int = 50, value_range: tuple[float, float] | None = None) -> tuple[Tensor, Tensor]:
    """(counts [bins], bin_edges [bins + 1]) of a 1-D tensor, the data behind a histogram plot."""
    values = values.detach().float().cpu()
    if value_range is None:
        value_range = (float(values.min()), float(values.max()))
    return torch.histogram(values, bins=bins, range=value_range)


def plot_log10_feature_density(log10_density: Tensor, path: str | Path, title: str = "", bins: int = 50) -> None:
    """Write the log10 feature-density histogram (seed 000's diagnostic plot) to a PNG.

    Dead features pile up at log10(1e-10) = -10, dense ones to the right of -2.
    """
    # The Figure/Agg canvas API, not pyplot: no GUI, and the caller's global backend is untouched.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    counts, edges = histogram(log10_density, bins)
    figure = Figure(figsize=(6, 4))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.stairs(counts.numpy(), edges.numpy(), fill=True)
    axes.axvline(-2, color="red", linestyle="--", linewidth=1, label="dense (1e-2)")
    axes.set_xlabel("log10 feature density")
    axes.set_ylabel("features")
    axes.set_title(title or f"{log10_density.numel()} features")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
