"""The update's spectrum (factorlab.inject.spectrum): LoRA's from its factors equals the SVD of the
materialised update; the summaries every injection cell records."""

import math

import pytest
import torch

from factorlab.inject.spectrum import (
    aggregate,
    block_type,
    dense_singular_values,
    lora_singular_values,
    summary_of,
)


@pytest.mark.parametrize(("out", "inp", "r"), [(16, 12, 1), (40, 24, 4), (24, 64, 8), (10, 10, 16)])
def test_lora_spectrum_from_factors_equals_the_svd_of_the_materialised_update(out, inp, r):
    generator = torch.Generator().manual_seed(out * inp + r)
    a = torch.randn(r, inp, generator=generator)
    b = torch.randn(out, r, generator=generator)
    got = lora_singular_values(a, b, 0.75)
    want = dense_singular_values(0.75 * b.double() @ a.double())[: len(got)]
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5 * float(want[0]))
    rest = dense_singular_values(0.75 * b.double() @ a.double())[len(got) :]
    assert all(float(v) <= 1e-9 * float(want[0]) for v in rest)  # nothing beyond min(r, out, in)


def test_a_rank_deficient_update_has_zero_singular_values_and_a_smaller_effective_rank():
    a = torch.randn(4, 20)
    b = torch.randn(30, 4)
    b[:, 2:] = 0  # only 2 of 4 directions used
    values = lora_singular_values(a, b, 1.0)
    assert float(values[2:].abs().max()) <= 1e-9 * float(values[0])
    assert summary_of(values)["effective_rank"] <= 2 + 1e-9


def test_norms_and_effective_rank():
    one = summary_of(torch.tensor([3.0, 0.0, 0.0]))
    assert one == {"nuclear": 3.0, "frobenius": 3.0, "effective_rank": 1.0}
    flat = summary_of(torch.tensor([2.0, 2.0, 2.0, 2.0]))
    assert flat["nuclear"] == 8.0 and flat["frobenius"] == 4.0 and math.isclose(flat["effective_rank"], 4.0)
    assert summary_of(torch.zeros(3))["effective_rank"] == 0.0  # no update at all


def test_block_types_of_llama_names_and_the_aggregate():
    names = {
        "model.layers.0.self_attn.q_proj": "attention.q",
        "model.layers.3.self_attn.k_proj": "attention.k",
        "model.layers.3.self_attn.v_proj": "attention.v",
        "model.layers.3.self_attn.o_proj": "attention.o",
        "model.layers.1.mlp.gate_proj": "mlp",
        "model.layers.1.mlp.down_proj": "mlp",
        "model.layers.1.mlp.adapter.down.adapter": "adapter",
    }
    assert {n: block_type(n) for n in names} == names
    spectra = [(n, torch.tensor([float(i + 1), 1.0])) for i, n in enumerate(names)]
    summary = aggregate(spectra)
    assert summary["mlp"]["weights"] == 2 and summary["mlp"]["nuclear"] == (5 + 1) + (6 + 1)
    assert summary["all"]["weights"] == len(names)
    assert math.isclose(summary["all"]["frobenius"] ** 2, sum(float(v.square().sum()) for _, v in spectra))
    assert summary["all"]["top_singular_values"][:3] == [7.0, 6.0, 5.0]


@pytest.mark.parametrize("method", ["lora", "full", "compacter++"])
def test_every_injection_cell_records_its_updates_spectrum(tmp_path, method):
    from factorlab.recipes.inject import inject_cell

    cell = {"model": "tiny", "relation": "country-code", "method": method, "epochs": 1}
    summary = inject_cell(cell, tmp_path)
    update = summary["update"]
    assert update["all"]["nuclear"] > 0 and update["all"]["weights"] > 0
    if method == "compacter++":
        assert set(update) == {"adapter", "all"}
    else:
        assert {"attention.q", "attention.k", "attention.v", "attention.o", "mlp"} <= set(update)
        assert update["all"]["weights"] == 4 * 7  # every linear weight of the 4 blocks, the head aside
