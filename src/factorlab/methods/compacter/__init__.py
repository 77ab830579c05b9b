from factorlab.methods.compacter.config import CompacterConfig, CompacterPlusPlusConfig, PHMAdapterConfig
from factorlab.methods.compacter.model import COMPACTER, COMPACTER_PLUS_PLUS, PHM_ADAPTER

__all__ = [
    "COMPACTER",
    "COMPACTER_PLUS_PLUS",
    "PHM_ADAPTER",
    "CompacterConfig",
    "CompacterPlusPlusConfig",
    "PHMAdapterConfig",
]
