from factorlab.methods.lora.config import LoraConfig
from factorlab.methods.lora.model import LORA

__all__ = ["LORA", "LoraConfig"]
