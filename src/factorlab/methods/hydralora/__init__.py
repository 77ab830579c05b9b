from factorlab.methods.hydralora.config import HydraLoraConfig
from factorlab.methods.hydralora.model import HYDRALORA

__all__ = ["HYDRALORA", "HydraLoraConfig"]
