"""The mixture-of-LoRA peers (issue 34), each tested for its defining behaviour on real PEFT folders."""

import copy

import peft
import pytest
import torch

from factorlab.errors import ConfigError, FactorlabError
from factorlab.mixer.lorahub import compose, lorahub_model, lorahub_search, read_loras
from tiny_models import build, inputs, logits

TARGETS = ["q_proj", "v_proj", "o_proj"]


def peft_folder(tmp_path, name: str, seed: int, r: int = 4, targets=TARGETS):
    base = build("llama")  # seeds its own weights
    torch.manual_seed(seed)  # then each folder's LoRA draws its own
    model = peft.get_peft_model(
        base, peft.LoraConfig(r=r, lora_alpha=8, target_modules=targets, init_lora_weights=False)
    )
    model.save_pretrained(tmp_path / name)
    return tmp_path / name, model


@pytest.fixture
def three_loras(tmp_path):
    loras = [peft_folder(tmp_path, f"lora{i}", seed=20 + i) for i in range(3)]
    batch = inputs("llama")
    assert not torch.allclose(logits(loras[0][1], batch), logits(loras[1][1], batch), atol=1e-3)
    return loras


def test_lorahub_composes_a_and_b_separately_and_each_one_hot_weight_is_that_peft_adapter(three_loras):
    folders = [f for f, _ in three_loras]
    loras = read_loras(folders)
    w = [0.7, -0.4, 1.2]
    for module, (a, b) in compose(loras, w).items():
        want_a = sum(wi * lora.weights[module][0] for wi, lora in zip(w, loras))
        want_b = sum(wi * lora.weights[module][1] for wi, lora in zip(w, loras))
        torch.testing.assert_close(a, want_a, atol=1e-6, rtol=0)
        torch.testing.assert_close(b, want_b, atol=1e-6, rtol=0)
    batch = inputs("llama")
    base = build("llama")
    for i, (_, peft_model) in enumerate(three_loras):  # w = e_i is LoRA i itself, as PEFT runs it
        one_hot = [float(i == k) for k in range(3)]
        torch.testing.assert_close(
            logits(lorahub_model(base, loras, one_hot), batch), logits(peft_model, batch)
        )
    # the composed adapter: base + s (sum w B)(sum w A) x, and merged into the base it gives the same
    hub = lorahub_model(base, loras, w)
    composed = logits(hub, batch)
    assert not torch.allclose(composed, logits(base, batch), atol=1e-3)
    merged = hub.merge_and_unload()
    torch.testing.assert_close(logits(merged, batch), composed, atol=1e-5, rtol=1e-5)


def test_lorahub_search_lowers_the_loss_and_is_reproducible(three_loras):
    folders = [f for f, _ in three_loras]
    base = build("llama")
    batch = inputs("llama")
    target = logits(lorahub_model(base, read_loras(folders), [1.0, 0.0, -0.5]), batch)

    def distance(model) -> float:  # a loss the search can reach: the outputs of a known composition
        return float((model(**batch).logits - target).square().mean())

    with torch.no_grad():
        at_zero = distance(lorahub_model(base, read_loras(folders), [0.0, 0.0, 0.0]))
    first = lorahub_search(base, folders, distance, budget=30, l1=0.0, seed=3)
    again = lorahub_search(base, folders, distance, budget=30, l1=0.0, seed=3)
    assert first.weights == again.weights and first.loss == again.loss
    assert len(first.history) == 30
    assert first.loss < 0.5 * at_zero, (first.loss, at_zero)
    torch.testing.assert_close(
        logits(first.model, batch), logits(lorahub_model(base, read_loras(folders), first.weights), batch)
    )


def test_lorahub_refuses_loras_it_cannot_add(tmp_path):
    a, _ = peft_folder(tmp_path, "a", seed=1, r=4)
    b, _ = peft_folder(tmp_path, "b", seed=2, r=8)
    c, _ = peft_folder(tmp_path, "c", seed=3, targets=["q_proj"])
    with pytest.raises(
        ConfigError,
        match=r"the LoRA in \S+/b has A \(8, 64\).* while the one in \S+/a has A \(4, 64\)",
    ):
        read_loras([a, b])
    with pytest.raises(ConfigError, match="adapt different modules"):
        read_loras([a, c])
    with pytest.raises(ConfigError, match="at least two"):
        read_loras([a])
    with pytest.raises(ConfigError, match="2 weights for 3 LoRAs"):
        compose(read_loras([a, a, a]), [1.0, 2.0])
    with pytest.raises(ConfigError, match="budget must be a positive"):
        lorahub_search(copy.deepcopy(build("llama")), [a, a], lambda m: 0.0, budget=0)


def test_hydralora_shares_one_a_and_routes_every_token_over_its_bs():
    from factorlab import HydraLoraConfig, adapt
    from factorlab.layers.hydra import HydraLoRALinear

    torch.manual_seed(0)
    base = build("llama").double()
    config = HydraLoraConfig(
        r=2, num_experts=3, lora_alpha=6, target_modules=TARGETS, init_lora_weights=False
    )
    hydra = adapt(base, config)
    layers = dict(hydra.adapter_layers())
    assert len(layers) == 2 * len(TARGETS)  # 2 decoder layers
    layer = layers["model.layers.0.self_attn.q_proj"]
    assert isinstance(layer, HydraLoRALinear)
    # one A per projection, shared by the three Bs; per projection r*in + E*out*r + E*in trainable weights
    names = [n for n, p in hydra.named_parameters() if p.requires_grad and "layers.0.self_attn.q_proj" in n]
    assert sorted(n.split("q_proj.")[1].split(".")[0] for n in names) == ["lora_A", "lora_B", "router"]
    a, bs, gate = (
        layer.lora_A["default"].weight,
        layer.lora_B["default"].weight,
        layer.router["default"].weight,
    )
    assert a.shape == (2, 64) and bs.shape == (3, 64, 2) and gate.shape == (3, 64)
    per_projection = (
        sum(p.numel() for n, p in hydra.named_parameters() if p.requires_grad and "q_proj" in n) // 2
    )
    assert per_projection == 2 * 64 + 3 * 64 * 2 + 3 * 64
    # y = base(x) + s sum_e softmax(W_g x)_e B_e A x, token by token
    x = torch.randn(2, 5, 64, dtype=torch.float64, requires_grad=True)
    got = layer(x)
    w = torch.softmax(x @ gate.T, dim=-1)
    want = layer.base_layer(x) + 3.0 * sum(w[..., e : e + 1] * (x @ a.T @ bs[e].T) for e in range(3))
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
    torch.testing.assert_close(layer.last_routing["default"].sum(-1), torch.ones(10, dtype=torch.float64))
    # every B's path runs through the one A: A's gradient is the sum of the experts' contributions
    (grad_a,) = torch.autograd.grad(got.square().sum(), a)
    parts = []
    for e in range(3):
        only = layer.base_layer(x) + 3.0 * w[..., e : e + 1] * (x @ a.T @ bs[e].T)
        rest = want - only  # the other experts, held fixed
        parts.append(torch.autograd.grad((only + rest.detach()).square().sum(), a)[0])
    torch.testing.assert_close(grad_a, sum(parts), atol=1e-9, rtol=1e-9)
    assert all(p.abs().max() > 0 for p in parts)
    with pytest.raises(FactorlabError, match="cannot be merged"):
        hydra.merge_and_unload()


def test_mole_has_one_gate_per_layer_from_the_running_hidden_state_summing_to_one(three_loras):
    from factorlab import LoraMixerConfig, adapt
    from factorlab.layers.mixer import gate_balance_loss
    from factorlab.methods.lora_mixer.model import mixer_layers

    folders = [f for f, _ in three_loras]
    torch.manual_seed(0)
    mole = adapt(build("llama"), LoraMixerConfig.mole(folders))
    shared = mole.shared_adapter_weights["default"]
    assert sorted(shared.routers) == ["0", "1"]  # one gate per decoder layer
    trainable = [n for n, p in mole.named_parameters() if p.requires_grad]
    assert trainable and all("routers" in n for n in trainable)  # the LoRAs stay frozen
    batch = inputs("llama", batch=2, seq=9)
    batch["attention_mask"] = torch.ones(2, 9, dtype=torch.long)
    batch["attention_mask"][1, 6:] = 0  # right padding in the second sample
    mole.train()
    out = mole(**batch, labels=batch["input_ids"])
    records = list(shared.routing.records)
    loss = gate_balance_loss(shared.routing)
    layers = mixer_layers(mole)
    assert len(records) == len(layers) == 2 * len(TARGETS)
    gates = [w.view(2, 9, 3) for _, w, _ in records]
    for g in gates:
        torch.testing.assert_close(g.sum(-1), torch.ones(2, 9))
    per_layer = len(TARGETS)
    for start in (0, per_layer):  # q, v and o of a layer follow the same gate
        for g in gates[start + 1 : start + per_layer]:
            assert torch.equal(g, gates[start])
    assert not torch.allclose(gates[0], gates[per_layer])  # layers gate separately
    # the gate at position t: softmax(W_l mean of the block's normalised hidden state up to t)
    hidden = {}
    layer0 = mole.get_base_model().model.layers[0]
    handle = layer0.self_attn.q_proj.register_forward_pre_hook(lambda m, a: hidden.setdefault("x", a[0]))
    with torch.no_grad():
        mole.eval()
        mole(**batch)
    handle.remove()
    x, real = hidden["x"], batch["attention_mask"].unsqueeze(-1).float()
    running = torch.cumsum(x * real, 1) / torch.cumsum(real, 1).clamp_min(1)
    want = torch.softmax(shared.routers["0"](running), -1)
    torch.testing.assert_close(gates[0], want.detach(), atol=1e-6, rtol=1e-5)
    # MoLE's balancing loss: -sum_i log(mean gate of expert i over real tokens), averaged over calls
    keep = batch["attention_mask"].reshape(-1).bool()
    by_hand = sum(-p[keep].mean(0).log().sum() for p, _, _ in records) / len(records)
    torch.testing.assert_close(loss, by_hand)
    assert out.loss.requires_grad


def test_mole_generates_with_its_cache_as_without(three_loras):
    from factorlab import LoraMixerConfig, adapt

    torch.manual_seed(1)
    mole = adapt(build("llama"), LoraMixerConfig.mole([f for f, _ in three_loras]))
    mole.eval()
    prompt = inputs("llama", batch=2, seq=6)
    kwargs = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        cached = mole.generate(**prompt, **kwargs)
        uncached = mole.generate(**prompt, use_cache=False, **kwargs)
    assert torch.equal(cached, uncached)


def test_arrow_routing_equals_peft_arrow(tmp_path):
    """factorlab's Arrow (routing="arrow" over the same PEFT folders, exact singular vectors) against peft's
    create_arrow_model (15 power iterations): LoRAs with a clear top singular value, so both find the
    same prototypes; logits equal within float32 rounding."""
    from factorlab import LoraMixerConfig, adapt

    folders = []
    for i in range(3):
        folder, model = peft_folder(tmp_path, f"lora{i}", seed=40 + i)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_A" in name:
                    p[0].mul_(8.0)  # one dominant direction per module: power iteration converges
        model.save_pretrained(folder)
        folders.append(folder)
    batch = inputs("llama", batch=2, seq=10)
    arrow_peft = peft.create_arrow_model(
        build("llama"),
        [str(f) for f in folders],
        peft.ArrowConfig(top_k=2, router_temperature=0.5, rng_seed=0),
    )
    mixer = adapt(
        build("llama"), LoraMixerConfig.from_peft_adapters(folders, routing="arrow", top_k=2, temperature=0.5)
    )
    want, got = logits(arrow_peft, batch), logits(mixer, batch)
    assert not torch.allclose(got, logits(build("llama"), batch), atol=1e-3)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
    shared = mixer.shared_adapter_weights["default"]
    mixer.train()
    mixer(**batch)
    weights = [w for _, w, _ in shared.routing.records]
    assert all(((w > 0).sum(-1) == 2).all() for w in weights)  # exactly top_k experts per token
    assert all(p is None for p, _, _ in shared.routing.records)  # no router, nothing for the routing losses


def test_mixlora_sends_each_token_to_exactly_its_top_two_experts_and_balances_them():
    from factorlab import MixLoraConfig, adapt
    from factorlab.layers.lora import LoRALinear
    from factorlab.layers.mixlora import MixLoRAFeedForward

    torch.manual_seed(0)
    model = adapt(build("llama").double(), MixLoraConfig(r=2, num_experts=4, init_lora_weights=False))
    layers = dict(model.adapter_layers())
    assert isinstance(layers["model.layers.0.mlp"], MixLoRAFeedForward)
    assert isinstance(layers["model.layers.0.self_attn.q_proj"], LoRALinear)  # attention: a plain LoRA
    ffn = layers["model.layers.0.mlp"]
    experts, mlp = ffn.experts["default"], ffn.base_layer
    with torch.no_grad():
        ffn.router["default"].weight.normal_(std=1.0)  # decisive routing
    x = torch.randn(3, 5, 64, dtype=torch.float64)
    got = ffn(x)
    s = ffn.settings["default"][1]
    flat, want = x.reshape(-1, 64), []
    for t in flat:  # token by token, every expert's full FFN, then the top two renormalised
        p = torch.softmax(ffn.router["default"](t), -1)
        top = p.topk(2).indices
        outputs = []
        for e in range(4):
            g = mlp.gate_proj(t) + s * experts.gate_B[e] @ (experts.gate_A[e] @ t)
            u = mlp.up_proj(t) + s * experts.up_B[e] @ (experts.up_A[e] @ t)
            h = mlp.act_fn(g) * u
            outputs.append(mlp.down_proj(h) + s * experts.down_B[e] @ (experts.down_A[e] @ h))
        want.append(sum(p[e] / p[top].sum() * outputs[e] for e in top))
        others = [e for e in range(4) if e not in top]
        assert not torch.allclose(outputs[others[0]], outputs[top[0]])  # the others would change it
    torch.testing.assert_close(got.reshape(-1, 64), torch.stack(want), atol=1e-10, rtol=0)
    # the auxiliary loss: coef * E * sum_i f_i P_i per block (real tokens), averaged over blocks
    batch = inputs("llama", batch=2, seq=8)
    batch["attention_mask"] = torch.ones(2, 8, dtype=torch.long)
    batch["attention_mask"][0, 5:] = 0
    model.train()
    with_aux = model(**batch, labels=batch["input_ids"])
    records = model.shared_adapter_weights["default"].records.records
    assert len(records) == 2 and all(c.shape == (16, 2) for _, c in records)
    assert all((c[:, 0] != c[:, 1]).all() for _, c in records)  # two distinct experts per token
    keep = batch["attention_mask"].reshape(-1).bool()
    by_hand = 0.0
    for p, c in records:
        p, c = p[keep], c[keep]
        f = torch.stack([(c == i).sum() for i in range(4)]).double() / c.numel()
        by_hand = by_hand + 4 * (f * p.mean(0)).sum()
    by_hand = 0.001 * by_hand / len(records)
    torch.testing.assert_close(model.last_aux_loss, by_hand)
    with torch.no_grad():
        model.eval()
        plain = model(**batch, labels=batch["input_ids"]).loss
    torch.testing.assert_close(with_aux.loss.detach(), plain + by_hand.detach())


def test_every_peer_is_a_unit_of_mixer_run_in_a_phase_with_a_row_in_the_report():
    from factorlab.mixer.config import PEERS, MixerExperimentConfig
    from factorlab.mixer.report import SYSTEMS
    from factorlab.recipes.mixer import UNITS, comparison_cells

    assert set(PEERS) <= set(UNITS) and set(PEERS.values()) == {0, 1}
    cfg = MixerExperimentConfig.preset_config("quick", seeds=[0, 1], peers=list(PEERS))
    phase1, phase2 = comparison_cells(cfg)
    assert {c["unit"] for c in phase1} >= {"HydraLoRA", "MixLoRA", "experts"}
    assert {c["unit"] for c in phase2} >= {"LoRAHub", "MoLE", "Arrow"}  # after the experts they compose
    # peers only add cells: every other cell keeps the id it has without them
    plain = MixerExperimentConfig.preset_config("quick", seeds=[0, 1])
    ids = {str(c) for phase in comparison_cells(plain) for c in phase}
    assert ids <= {str(c) for phase in comparison_cells(cfg) for c in phase}
    assert len(SYSTEMS) == len(set(SYSTEMS))
    # LoRAHub's own settings are in its cells' ids (a changed budget never reuses a result), no one else's
    for cell in (c for phase in comparison_cells(cfg) for c in phase):
        own = cell["unit"] == "LoRAHub"
        assert ("lorahub_budget" in cell["config"]) == own, cell["unit"]
        assert ("lorahub_examples_per_task" in cell["config"]) == own, cell["unit"]
    with pytest.raises(ConfigError, match=r"unknown peer\(s\) \['MoLa'\]; peers: HydraLoRA, MixLoRA"):
        MixerExperimentConfig.preset_config("quick", peers=["MoLa"])


def test_skipped_baselines_drop_their_cells_only():
    from factorlab.mixer.config import SKIPPABLE, MixerExperimentConfig
    from factorlab.recipes.mixer import comparison_cells

    plain = MixerExperimentConfig.preset_config("quick", seeds=[0, 1])
    skipped = MixerExperimentConfig.preset_config("quick", seeds=[0, 1], skip=["full", "X-LoRA"])
    every = [str(c) for phase in comparison_cells(plain) for c in phase]
    kept = [str(c) for phase in comparison_cells(skipped) for c in phase]
    assert kept == [c for c in every if "'unit': 'full'" not in c and "'unit': 'X-LoRA'" not in c]
    assert len(kept) == len(every) - 4  # two units x two seeds
    assert "experts" not in SKIPPABLE and "joint" not in SKIPPABLE  # the mixer and what it is built from
    with pytest.raises(ConfigError, match=r"cannot skip \['experts'\]; skippable baselines: full"):
        MixerExperimentConfig.preset_config("quick", skip=["experts"])
