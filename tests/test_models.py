"""The dequantised-SmolLM2 cache is keyed on everything that makes it (no SmolLM2 needed here)."""

import importlib.metadata

from factorlab.models import SMOLLM2_GGUF, smollm2_source_key


def test_the_smollm2_cache_key_follows_the_gguf_bytes_and_the_dequantisers_versions(tmp_path, monkeypatch):
    gguf = tmp_path / SMOLLM2_GGUF
    gguf.write_bytes(b"GGUF" + bytes(range(256)) * 100)
    first = smollm2_source_key(tmp_path)
    assert first == smollm2_source_key(tmp_path) and len(first) == 16
    data = bytearray(gguf.read_bytes())
    data[1000] ^= 1  # one bit of one weight, same size
    gguf.write_bytes(bytes(data))
    second = smollm2_source_key(tmp_path)
    assert second != first
    real = importlib.metadata.version
    for package in ("transformers", "gguf"):
        monkeypatch.setattr(
            importlib.metadata, "version", lambda name, p=package: "0.0.1" if name == p else real(name)
        )
        assert smollm2_source_key(tmp_path) != second, package
    monkeypatch.setattr(importlib.metadata, "version", real)
    assert smollm2_source_key(tmp_path) == second
