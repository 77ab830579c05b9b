from factorlab.methods.lora_mixer.config import ExpertSpec, LoraMixerConfig
from factorlab.methods.lora_mixer.model import LORA_MIXER, routing_weights_per_sample, set_routing, set_stage

__all__ = [
    "LORA_MIXER",
    "ExpertSpec",
    "LoraMixerConfig",
    "routing_weights_per_sample",
    "set_routing",
    "set_stage",
]
