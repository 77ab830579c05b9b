"""The dequantised-SmolLM2 cache is keyed on everything that makes it (no SmolLM2 or gguf needed here)."""

import importlib.metadata

from factorlab.models import SMOLLM2_GGUF, smollm2_source_key


def test_the_smollm2_cache_key_follows_the_gguf_bytes_and_the_dequantisers_versions(tmp_path, monkeypatch):
    versions = {"transformers": "5.24.0", "gguf": "0.19.0"}  # gguf is absent where SmolLM2 is not installed
    monkeypatch.setattr(importlib.metadata, "version", lambda name: versions[name])
    gguf = tmp_path / SMOLLM2_GGUF
    gguf.write_bytes(b"GGUF" + bytes(range(256)) * 100)
    first = smollm2_source_key(tmp_path)
    assert first == smollm2_source_key(tmp_path) and len(first) == 16
    data = bytearray(gguf.read_bytes())
    data[1000] ^= 1  # one bit of one weight, same size
    gguf.write_bytes(bytes(data))
    second = smollm2_source_key(tmp_path)
    assert second != first
    for package in ("transformers", "gguf"):
        versions[package] += ".post1"
        assert smollm2_source_key(tmp_path) != second, package
        versions[package] = versions[package].removesuffix(".post1")
    assert smollm2_source_key(tmp_path) == second
