"""Compacter, Compacter++ and PHM-Adapter configs, with AdapterHub's field names and defaults.

Where the adapters go (``target_roles``, defaults below): on the output of the attention block
and/or of the FFN block, before the residual add — for T5 the self-attention and FFN blocks of
encoder and decoder, not cross-attention, as in the paper.

Defaults are AdapterHub's (a config written there means the same here). The paper's recipe,
``paper_recipe()`` on each config: ``phm_dim=4`` (PHM-Adapter 12), ``reduction_factor=32``,
``non_linearity="gelu_new"``, LayerNorms trained (``train_layer_norms=True``), learning rate 3e-3,
3 epochs on large sets and 20 on small ones (the last two are the training loop's). Initialisation as
the original code: shared rule N(0, 1e-4^2) (``phm_init_range``), a layer's own (unshared) rule
N(0, 0.01^2) (``UNSHARED_RULE_STD``, fixed in the original code and AdapterHub), fast weights
glorot-uniform with gain sqrt(2).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from factorlab.core.method import AdapterConfig
from factorlab.errors import ConfigError
from factorlab.layers.bottleneck import ACTIVATIONS
from factorlab.layers.phm import FAST_INITS, RULE_INITS
from factorlab.validation import check_fields, check_targeting

UNSHARED_RULE_STD = 0.01
"""Init std of a PHM layer's own rule (shared_phm_rule=False), as the original code and AdapterHub."""

PAPER_RECIPE = {"reduction_factor": 32, "non_linearity": "gelu_new", "train_layer_norms": True}
PAPER_LR = 3e-3
"""The paper's learning rate for every Compacter variant (T5-base, GLUE / SuperGLUE)."""


def reduction_for(hidden: int, phm_dim: int = 4, largest: int = 32) -> int:
    """The largest reduction factor <= ``largest`` whose bottleneck ``phm_dim`` divides (T5-base: 32)."""
    for factor in range(largest, 0, -1):
        bottleneck = hidden // factor
        if bottleneck >= phm_dim and bottleneck % phm_dim == 0:
            return factor
    raise ConfigError(
        f"no reduction factor gives a bottleneck divisible by phm_dim={phm_dim} for hidden {hidden}."
    )


@dataclass
class CompacterConfig(AdapterConfig):
    """Compacter: LPHM bottleneck adapters after attention and FFN blocks (Karimi Mahabadi et al., 2021)."""

    method: ClassVar[str] = "compacter"
    default_roles: ClassVar[tuple[str, ...]] = ("attn_out", "ffn_out")
    paper_phm_dim: ClassVar[int] = 4

    reduction_factor: float = 32
    """Bottleneck size = hidden size / reduction_factor."""
    non_linearity: str = "gelu"
    """Activation between down and up projection (see factorlab.layers.bottleneck.ACTIVATIONS)."""
    phm_dim: int = 4
    """n: number of Kronecker terms; must divide the hidden and the bottleneck size."""
    factorized_phm_W: bool = True
    """Fast weights B_i = s_i t_i^T of rank phm_rank (Compacter's LPHM); False: full B_i."""
    shared_W_phm: bool = False
    """Share the fast weights across all layers too (one down and one up set per model)."""
    shared_phm_rule: bool = True
    """One rule A (n x n x n) for every PHM layer of the model, encoder and decoder alike."""
    factorized_phm_rule: bool = False
    """Rank-one rule matrices A_i = a_i b_i^T."""
    phm_c_init: str = "normal"
    """Rule init: "normal" N(0, phm_init_range^2) or "uniform" U(-phm_init_range, phm_init_range)."""
    phm_init_range: float = 1e-4
    """Scale of the rule init (and of "normal" fast-weight init)."""
    learn_phm: bool = True
    """Train the rule. False keeps it fixed at its init (stored as a buffer, still saved)."""
    hypercomplex_nonlinearity: str = "glorot-uniform"
    """Fast-weight init: "glorot-uniform", "glorot-normal" (gain sqrt 2, as the original code) or "normal"."""
    phm_rank: int = 1
    """Rank r of the factorized fast weights."""
    phm_bias: bool = True
    """Biases in the PHM layers (initialised to zero)."""
    train_layer_norms: bool = False
    """Also train (copies of) every LayerNorm / RMSNorm, as the paper's recipe does; saved with it."""

    def __post_init__(self) -> None:
        check_fields(self)
        check_targeting(self)
        if not self.reduction_factor or self.reduction_factor <= 0:
            raise ConfigError(f"reduction_factor must be > 0, got {self.reduction_factor}.")
        if self.non_linearity.lower() not in ACTIVATIONS:
            raise ConfigError(
                f"unknown non_linearity {self.non_linearity!r}; choose one of {sorted(ACTIVATIONS)}."
            )
        if self.phm_c_init not in RULE_INITS:
            raise ConfigError(f"unknown phm_c_init {self.phm_c_init!r}; choose one of {RULE_INITS}.")
        if self.hypercomplex_nonlinearity not in FAST_INITS:
            raise ConfigError(
                f"unknown hypercomplex_nonlinearity (fast-weight init) {self.hypercomplex_nonlinearity!r}; "
                f"choose one of {FAST_INITS}."
            )
        if not isinstance(self.phm_dim, int) or self.phm_dim < 1:
            raise ConfigError(f"phm_dim must be a positive integer, got {self.phm_dim!r}.")
        if not isinstance(self.phm_rank, int) or self.phm_rank < 1:
            raise ConfigError(f"phm_rank must be a positive integer, got {self.phm_rank!r}.")

    @classmethod
    def paper_recipe(cls, **overrides: Any) -> CompacterConfig:
        """This variant as the paper trains it: phm_dim 4 (PHM-Adapter: 12), reduction factor 32,
        gelu_new, LayerNorms trained; train with lr ``PAPER_LR`` (3e-3). ``overrides`` change fields."""
        return cls(**{**PAPER_RECIPE, "phm_dim": cls.paper_phm_dim, **overrides})


@dataclass
class CompacterPlusPlusConfig(CompacterConfig):
    """Compacter++: Compacter after the FFN block only."""

    method: ClassVar[str] = "compacter++"
    default_roles: ClassVar[tuple[str, ...]] = ("ffn_out",)


@dataclass
class PHMAdapterConfig(CompacterConfig):
    """PHM-Adapter: placed like Compacter, but every layer has its own rule and full fast weights.
    The paper uses n = 12."""

    method: ClassVar[str] = "phm_adapter"
    paper_phm_dim: ClassVar[int] = 12
    phm_dim: int = 12
    factorized_phm_W: bool = False
    shared_phm_rule: bool = False
