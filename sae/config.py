"""SAEConfig: what an SAE is (architecture, sizes, loss coefficients, initialisation, where its
inputs come from).

Every default below is chosen on the NORMALISED input scale: the trainer multiplies activations by
s = sqrt(d_in / E||x||^2) so that E||x||^2 = d_in, and folds s back into the weights at export
(`SAE.fold_input_scale`). On raw activations the L1-type coefficients would need rescaling by the
squared input norm; on the normalised scale one default serves every hook and model.
"""
from dataclasses import dataclass, replace

ARCHITECTURES = ("standard", "gated", "topk", "batchtopk", "jumprelu", "normalized")
# Architectures whose sparsity is a loss coefficient that a target_l0 controller adjusts.
PENALISED_ARCHITECTURES = ("standard", "gated", "jumprelu", "normalized")
K_ARCHITECTURES = ("topk", "batchtopk")
# Default L1 coefficients on the normalised scale, per architecture (topk, batchtopk, jumprelu
# have no L1 term). standard: the penalty is lambda * sum_i f_i ||d_i|| (April 2024 form, free decoder
# rows); on the tiny model (blocks.2, d_sae 1024, 2M tokens, lr 5e-3, grad clip 1 and the other
# TrainConfig defaults) lambda 1.5 gives L0 21.9 / EV 0.872 (no clip: 27.6 / 0.867); at 1M tokens
# lambda 2.24 gives L0 22.4 / 0.812. The seed form (unit-norm rows, plain L1; teammate's sweep,
# no clip): lambda 5 -> L0 9.7 / EV 0.53, 3 -> 19 / 0.76, 2.2 -> 26 / 0.81, 1.7 -> 32 / 0.85,
# 1.5 -> 34.7 / 0.862. 1.5 sits inside L0 10-40 with EV >= 0.85 in both forms. gated: the standard value (its gate
# L1 has the same units), not swept separately. normalized: alpha, with beta = alpha * M^2 and
# M^2 ~ d_in on the normalised scale, alpha = 1.5 / 128 (not swept).
DEFAULT_L1_COEFFICIENTS = {"standard": 1.5, "gated": 1.5, "normalized": 0.012}


@dataclass
class SAEConfig:
    """Architecture and loss settings of one SAE; validated on construction.

    `hook_name`, `model_name`, `context_size` and `prepend_bos` describe the activations the SAE
    reads; they are saved in cfg.json's `metadata` for SAELens and are not used in the maths.
    """

    architecture: str
    d_in: int
    d_sae: int
    hook_name: str
    model_name: str = "gpt2"
    context_size: int = 128
    prepend_bos: bool = True
    # standard, gated: the L1 coefficient lambda. normalized: alpha, and the loss uses
    # beta = alpha * input_mean_norm**2 (paper 002). None: the architecture's default in
    # DEFAULT_L1_COEFFICIENTS, filled in on construction.
    l1_coefficient: float | None = None
    # jumprelu: lambda of the L0 penalty lambda * sum_i H(z_i - theta_i); with target_l0 it is the
    # controller's starting point. Own sweep (tiny model, blocks.2, d_sae 1024, inputs at
    # E||x||^2 = d_in, 1M tokens): L0 keeps falling for hundreds of steps after the penalty stops
    # pulling (the threshold lags), so SAELens's 1.0 drives L0 below 20 whatever a controller does
    # afterwards (14 at target 20); from 0.2 the controller ends at 9.4 / 40.3 for targets 10 / 40.
    l0_coefficient: float = 0.2
    # standard, gated, jumprelu, normalized: the trainer adjusts the sparsity coefficient during
    # training so that L0 ends at this value. topk, batchtopk: k defaults to it. None: off.
    target_l0: float | None = None
    use_ghost_grads: bool = False  # standard only
    # standard only (None elsewhere: each other architecture fixes its own decoder constraint).
    # False, the default: Anthropic's April 2024 update, as SAELens 6 trains its standard SAE: decoder
    # rows are free parameters, initialised at norm encoder_init_norm (SAELens's decoder_init_norm
    # 0.1) with W_enc = W_dec^T exactly, and the L1 penalty weights each feature by its row's norm,
    # lambda * sum_i f_i ||d_i||, so that shrinking f while growing d_i does not dodge it. True: the
    # seed recipe (000/001): rows renormalised to unit norm after every step, the parallel part of
    # their gradient removed, plain lambda * sum_i f_i. Measured on the tiny model (blocks.2, d_sae
    # 1024, target L0 20, 1M tokens): see bench/README.md, "SAEs vs SAELens (issue 9)".
    unit_norm_decoder: bool | None = None
    k: float | None = None  # topk: active latents per token (an int); batchtopk: mean per token over a batch
    k_aux: int | None = None  # topk, batchtopk: dead latents in the AuxK loss; None means d_in // 2
    auxk_coefficient: float = 1 / 32  # topk, batchtopk: weight of the AuxK loss (OpenAI's alpha)
    noise_std: float = 1.0  # normalized: sigma of the pre-activation noise, training only
    input_mean_norm: float | None = None  # normalized: mean L2 norm of this hook's inputs
    # jumprelu: bandwidth epsilon of the rectangle kernel in the threshold's straight-through
    # gradient, and the initial threshold. SAELens defaults (jumprelu_bandwidth, jumprelu_init_threshold).
    jumprelu_bandwidth: float = 0.05
    jumprelu_init_threshold: float = 0.01
    # batchtopk: the inference threshold is an EMA of the smallest kept activation per batch, with
    # this rate. SAELens default (topk_threshold_lr).
    topk_threshold_lr: float = 0.01
    # Initial norm of every encoder column; the decoder rows start at unit norm and the encoder as
    # their transpose times this. 0.1: SAELens's decoder_init_norm (Anthropic's April 2024 update);
    # the teammate's measurement on the tiny model: 1.0 (the seed recipe) starts at a squared error
    # ~8x the variance and lags SAELens at 2M tokens, 0.1 closes the gap.
    encoder_init_norm: float = 0.1
    # How b_dec starts when the trainer calls `initialize_b_dec`: "geometric_median" (seed 000,
    # Bricken et al.), "mean" or "zeros". Geometric median vs zeros: no measurable difference on the
    # tiny model (FIELD-NOTES), kept as the seed's recipe.
    b_dec_init: str = "geometric_median"

    @classmethod
    def seed_recipe(cls, d_in: int, d_sae: int, hook_name: str, **overrides) -> "SAEConfig":
        """Seed 000/001's standard SAE: ghost grads on the pre-activation, geometric-median b_dec,
        unit-norm decoder rows (unit_norm_decoder=True) with the encoder as their exact transpose. Its lambda 8e-5 belonged
        to a loss divided by the input norm, so the L1 coefficient stays at our normalised default."""
        settings = dict(use_ghost_grads=True, unit_norm_decoder=True, encoder_init_norm=1.0, b_dec_init="geometric_median")
        return cls("standard", d_in=d_in, d_sae=d_sae, hook_name=hook_name, **{**settings, **overrides})

    def with_target_l0(self, target_l0: float) -> "SAEConfig":
        """A copy aiming at another L0 (for k architectures, k follows the target)."""
        k = None if self.architecture not in K_ARCHITECTURES else (round(target_l0) if self.architecture == "topk" else target_l0)
        return replace(self, target_l0=target_l0, k=k)

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"architecture must be one of {ARCHITECTURES}, got {self.architecture!r}")
        for name in ("d_in", "d_sae", "context_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not self.hook_name:
            raise ValueError("hook_name must name the hook the SAE reads, e.g. 'blocks.8.hook_resid_pre'")
        if self.l1_coefficient is None:
            self.l1_coefficient = DEFAULT_L1_COEFFICIENTS.get(self.architecture, 0.0)
        for name in ("l1_coefficient", "l0_coefficient"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.architecture == "standard":
            if self.unit_norm_decoder is None:
                self.unit_norm_decoder = False
        elif self.unit_norm_decoder is not None:
            raise ValueError(f"unit_norm_decoder applies to the standard SAE only, not {self.architecture!r}")
        if self.use_ghost_grads and self.architecture != "standard":
            raise ValueError(f"use_ghost_grads applies to the standard SAE only, not {self.architecture!r}")
        if self.target_l0 is not None and not 0 < self.target_l0 <= self.d_sae:
            raise ValueError(f"target_l0 must be in (0, d_sae={self.d_sae}], got {self.target_l0}")
        if not self.encoder_init_norm > 0:
            raise ValueError(f"encoder_init_norm must be > 0, got {self.encoder_init_norm}")
        if self.b_dec_init not in ("geometric_median", "mean", "zeros"):
            raise ValueError(f"b_dec_init must be 'geometric_median', 'mean' or 'zeros', got {self.b_dec_init!r}")
        if not (self.jumprelu_bandwidth > 0 and self.jumprelu_init_threshold >= 0):
            raise ValueError("jumprelu_bandwidth must be > 0 and jumprelu_init_threshold >= 0")
        if not 0 < self.topk_threshold_lr <= 1:
            raise ValueError(f"topk_threshold_lr must be in (0, 1], got {self.topk_threshold_lr}")
        self._validate_topk()
        self._validate_normalized()

    def _validate_topk(self) -> None:
        if self.architecture not in K_ARCHITECTURES:
            if self.k is not None or self.k_aux is not None:
                raise ValueError(f"k and k_aux apply to the topk and batchtopk SAEs only, not {self.architecture!r}")
            return
        if self.k is None and self.target_l0 is not None:
            self.k = round(self.target_l0) if self.architecture == "topk" else float(self.target_l0)
        if self.architecture == "topk":
            if not isinstance(self.k, int) or isinstance(self.k, bool) or not 1 <= self.k <= self.d_sae:
                raise ValueError(f"topk needs an int k with 1 <= k <= d_sae={self.d_sae}, got {self.k!r}")
        elif not isinstance(self.k, (int, float)) or isinstance(self.k, bool) or not 0 < self.k <= self.d_sae:
            raise ValueError(f"batchtopk needs k with 0 < k <= d_sae={self.d_sae}, got {self.k!r}")
        if self.target_l0 is not None and abs(self.k - self.target_l0) > 0.5:
            raise ValueError(f"k={self.k} contradicts target_l0={self.target_l0}; give one of them")
        if self.k_aux is not None and not (isinstance(self.k_aux, int) and 1 <= self.k_aux <= self.d_sae):
            raise ValueError(f"k_aux must be an int with 1 <= k_aux <= d_sae={self.d_sae}, got {self.k_aux!r}")
        if self.auxk_coefficient < 0:
            raise ValueError(f"auxk_coefficient must be >= 0, got {self.auxk_coefficient}")

    def _validate_normalized(self) -> None:
        if self.architecture != "normalized":
            if self.input_mean_norm is not None:
                raise ValueError(f"input_mean_norm applies to the normalized SAE only, not {self.architecture!r}")
            return
        if self.input_mean_norm is None or not self.input_mean_norm > 0:
            raise ValueError(
                "the normalized SAE needs input_mean_norm > 0: the mean L2 norm of the hook's activations "
                f"(from the cache's per-hook statistics), got {self.input_mean_norm!r}"
            )
        if self.noise_std < 0:
            raise ValueError(f"noise_std must be >= 0, got {self.noise_std}")

    @property
    def sparsity_coefficient(self) -> float | None:
        """The loss coefficient a target_l0 controller scales (None for the k architectures)."""
        if self.architecture == "jumprelu":
            return self.l0_coefficient
        return self.l1_coefficient if self.architecture in PENALISED_ARCHITECTURES else None

    @property
    def auxk_latents(self) -> int:
        """Number of dead latents the topk AuxK loss uses (OpenAI's k_aux)."""
        # d_in // 2 is the heuristic of the TopK paper (appendix B.1), capped by the dictionary size.
        return self.k_aux if self.k_aux is not None else min(max(self.d_in // 2, 1), self.d_sae)
