from factorlab.methods.mixlora.config import MixLoraConfig
from factorlab.methods.mixlora.model import MIXLORA

__all__ = ["MIXLORA", "MixLoraConfig"]
