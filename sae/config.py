"""SAEConfig: what an SAE is (architecture, sizes, loss coefficients, where its inputs come from)."""
from dataclasses import dataclass

ARCHITECTURES = ("standard", "gated", "topk", "normalized")


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
    # beta = alpha * input_mean_norm**2 (paper 002). topk has no L1 term.
    l1_coefficient: float = 1e-3
    use_ghost_grads: bool = False  # standard only
    k: int | None = None  # topk only: active latents per token
    k_aux: int | None = None  # topk: dead latents in the AuxK loss; None means d_in // 2
    auxk_coefficient: float = 1 / 32  # topk: weight of the AuxK loss (OpenAI's alpha)
    noise_std: float = 1.0  # normalized: sigma of the pre-activation noise, training only
    input_mean_norm: float | None = None  # normalized: mean L2 norm of this hook's inputs

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"architecture must be one of {ARCHITECTURES}, got {self.architecture!r}")
        for name in ("d_in", "d_sae", "context_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not self.hook_name:
            raise ValueError("hook_name must name the hook the SAE reads, e.g. 'blocks.8.hook_resid_pre'")
        if self.l1_coefficient < 0:
            raise ValueError(f"l1_coefficient must be >= 0, got {self.l1_coefficient}")
        if self.use_ghost_grads and self.architecture != "standard":
            raise ValueError(f"use_ghost_grads applies to the standard SAE only, not {self.architecture!r}")
        self._validate_topk()
        self._validate_normalized()

    def _validate_topk(self) -> None:
        if self.architecture != "topk":
            if self.k is not None or self.k_aux is not None:
                raise ValueError(f"k and k_aux apply to the topk SAE only, not {self.architecture!r}")
            return
        if not isinstance(self.k, int) or not 1 <= self.k <= self.d_sae:
            raise ValueError(f"topk needs an int k with 1 <= k <= d_sae={self.d_sae}, got {self.k!r}")
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
    def auxk_latents(self) -> int:
        """Number of dead latents the topk AuxK loss uses (OpenAI's k_aux)."""
        # d_in // 2 is the heuristic of the TopK paper (appendix B.1), capped by the dictionary size.
        return self.k_aux if self.k_aux is not None else min(max(self.d_in // 2, 1), self.d_sae)
