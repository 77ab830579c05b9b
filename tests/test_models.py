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


def test_publish_folder_replaces_whole_and_sweeps_only_dead_builders_temporaries(tmp_path):
    import subprocess
    import sys

    from factorlab.runtime import publish_folder

    folder = tmp_path / "cache-abc"
    folder.mkdir()
    (folder / "old.txt").write_text("old")
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True)
    dead = tmp_path / f"cache-abc.tmp{int(finished.stdout)}"  # a builder that was killed mid-write
    live = tmp_path / "cache-abc.tmp1"  # pid 1 runs: another builder still writing
    for partial in (dead, live):
        partial.mkdir()
        (partial / "half.bin").write_bytes(b"\0")

    def write(tmp):
        tmp.mkdir()
        (tmp / "model.bin").write_bytes(b"weights")

    assert publish_folder(folder, write) == folder
    assert sorted(p.name for p in folder.iterdir()) == ["model.bin"]
    assert not dead.exists() and live.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache-abc", "cache-abc.tmp1"]


def test_publish_folder_keeps_a_finished_cache_another_builder_published_first(tmp_path):
    """Two grid workers build the same cache: the one that finishes second drops its copy instead of
    deleting the first one, which another process may be loading."""
    from factorlab.runtime import publish_folder

    folder = tmp_path / "cache-abc"

    def finished(path):
        return (path / "model.bin").exists()

    def write(content):
        def fill(tmp):
            if content == b"second":  # the first builder publishes while the second is still writing
                publish_folder(folder, write(b"first"), keep=finished)
            tmp.mkdir()
            (tmp / "model.bin").write_bytes(content)

        return fill

    assert publish_folder(folder, write(b"second"), keep=finished) == folder
    assert (folder / "model.bin").read_bytes() == b"first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache-abc"]  # the second copy is gone
    unfinished = tmp_path / "cache-def"
    unfinished.mkdir()  # an unfinished folder (no model.bin) is replaced as before
    publish_folder(unfinished, write(b"first"), keep=finished)
    assert (unfinished / "model.bin").read_bytes() == b"first"
