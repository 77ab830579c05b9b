"""LoRA-Mixer: routed LoRA experts inside a projection (Li et al., 2025, "serial" routing).

    y = base(x) + sum_e w_e(x) * s_e * B_e A_e x

    A_e (r_e, in), B_e (out, r_e), s_e = alpha_e / r_e (or / sqrt(r_e) with rsLoRA)
    w(x) in R^E per token:
        hard     one-hot of the sample's task id (task_ids, one per sample)
        soft     softmax(router(x) / temperature)       (pooling "sample": router(running mean of the
                 sample's x), one gate per router and position, as MoLE's per-layer gate)
        topk     soft, keep the k largest, renormalise
        uniform  1/E (the "average of the experts" baseline)
        arrow    training-free (Ostapenko et al., 2024, "Towards Modular LLMs by Building and Reusing a
                 Library of LoRAs", Arrow): |x . v_e| with v_e the top right singular vector of expert
                 e's B_e A_e, softmax(/ temperature) over the top_k experts, the others 0

All experts run in two GEMMs: experts are stacked (ranks padded to the largest, with a mask, so
experts of different ranks coexist) and the routing weights scale the rank-space activations:

    h = x A_cat^T            (N, E * r_max)    one GEMM for every expert's A
    h = h * (w ⊗ s ⊗ mask)   per expert, per token
    y = h B_cat              (N, out)          one GEMM for every expert's B

Pure torch. The routing context (task ids, recorded router probabilities for the auxiliary
loss) is a plain object shared by every mixer layer of one adapter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from factorlab.errors import ConfigError
from factorlab.layers.base import AdapterLayer
from factorlab.layers.lora import adapter_dtype, init_lora_pair
from factorlab.layers.packed import lora_per_row
from factorlab.layers.shapes import weight_dims

ROUTINGS = ("hard", "soft", "topk", "uniform", "arrow")


@dataclass
class RoutingState:
    """Per-call routing inputs and per-layer records, shared by one adapter's mixer layers."""

    num_experts: int
    routing: str = "soft"
    top_k: int = 2
    temperature: float = 1.0
    task_ids: torch.Tensor | None = None  # (batch,) for hard routing
    task_labels: torch.Tensor | None = None  # (batch,) to supervise soft routing (route_label_coef)
    record: bool = False  # keep this forward's routing (aux loss, inspection)
    token_mask: torch.Tensor | None = None  # (batch, tokens), False at padding: the losses skip it
    # one entry per mixer-layer call: router probabilities (None without a router), weights used,
    # and tokens per sample (to map rows back to samples)
    records: list[tuple[torch.Tensor | None, torch.Tensor, int]] = field(default_factory=list)
    pooling: str = "token"  # "sample": a gate from the sample's running mean input (MoLE), see pooled_logits
    pooled: dict[tuple[str, int], object] = field(default_factory=dict)  # pooled_logits' per-call state

    def clear(self) -> None:
        self.records.clear()
        self.pooled.clear()


def route(logits: torch.Tensor | None, state: RoutingState, batch: int, tokens: int) -> torch.Tensor:
    """Routing weights (batch * tokens, E) for one projection call."""
    E = state.num_experts
    if state.task_ids is not None:  # hard routing (also forced by passing task_ids with another mode)
        weights = F.one_hot(sample_task_ids(state.task_ids, batch), E).to(torch.float32)
        return weights.repeat_interleave(tokens, dim=0)
    if state.routing == "hard":
        raise ConfigError(
            "routing='hard' needs task ids: pass task_ids=LongTensor[batch] to forward / generate."
        )
    if state.routing == "uniform":
        return torch.full((batch * tokens, E), 1.0 / E)
    if state.routing == "arrow":  # logits: |x . v_e|; a softmax over the top k only
        top, index = logits.float().topk(min(state.top_k, E), dim=-1)
        scores = torch.full_like(logits, float("-inf"), dtype=torch.float32).scatter(-1, index, top)
        return torch.softmax(scores / state.temperature, dim=-1)
    probs = torch.softmax(logits.float() / state.temperature, dim=-1)
    if state.routing == "soft" or state.top_k >= E:
        return probs
    top, index = probs.topk(state.top_k, dim=-1)
    return torch.zeros_like(probs).scatter(-1, index, top / top.sum(-1, keepdim=True))


def sample_task_ids(task_ids: torch.Tensor, batch: int) -> torch.Tensor:
    """One task id per sample of a ``batch`` (the model checked their range once per call): generation's
    beams / num_return_sequences repeat each prompt's id."""
    if task_ids.shape[0] != batch:
        if task_ids.shape[0] == 0 or batch % task_ids.shape[0]:
            raise ConfigError(f"task_ids has {task_ids.shape[0]} entries but the batch has {batch} samples.")
        task_ids = task_ids.repeat_interleave(batch // task_ids.shape[0])
    return task_ids


def pooled_logits(
    layer: nn.Module, router: nn.Module, x: torch.Tensor, state: RoutingState, batch: int, tokens: int
) -> torch.Tensor:
    """Router logits under ``pooling="sample"`` (MoLE's gate), (batch * tokens, E): at each position the
    router applied to the mean of the sample's real inputs up to that position (a causal mean, so no
    position's gate sees later tokens, and cached generation gives what a full forward gives).

    One gate per router per model step: the first projection that uses a router in a step computes it,
    the others reuse it (with a router per layer, every projection of the layer follows the gate set from
    the layer's first routed input, Llama's q_proj: the block's normalised hidden state). Each projection
    counts its own calls, so its n-th call takes the router's n-th step, and the running sums carry over
    the steps of one generate call."""
    key, calls = id(router), state.pooled.setdefault(("calls", id(layer)), [0])
    steps = state.pooled.setdefault(("steps", key), [])
    if calls[0] == len(steps):
        carry = state.pooled.get(("carry", key))
        # Within one generate call, a step shorter than what came before continues it (a KV cache: only the
        # new tokens, all real); a longer one recomputes the whole sequence. A step with gradients
        # (training) is always a whole sequence, so gradient checkpointing's recomputation of a block
        # gives the same gate.
        continues = carry is not None and tokens <= carry[2] and not torch.is_grad_enabled()
        real = torch.ones(batch, tokens, dtype=x.dtype, device=x.device)
        mask = state.token_mask  # the call's attention mask: the prompt's, in generation
        if not continues and mask is not None and mask.shape[0] == batch:
            width = min(mask.shape[1], tokens)
            real[:, :width] = mask[:, :width].to(x.dtype)
        sums = torch.cumsum(x.view(batch, tokens, -1) * real.unsqueeze(-1), dim=1)  # (batch, tokens, in)
        counts = torch.cumsum(real, dim=1).unsqueeze(-1)
        if continues:
            sums, counts = sums + carry[0].unsqueeze(1), counts + carry[1].unsqueeze(1)
        seen = carry[2] + tokens if continues else tokens
        state.pooled[("carry", key)] = (sums[:, -1].detach(), counts[:, -1], seen)
        steps.append(router(sums / counts.clamp_min(1)).reshape(batch * tokens, -1))
    calls[0] += 1
    return steps[calls[0] - 1]


def init_router(router: nn.Linear, std: float = 0.02) -> None:
    """Near-uniform routing with the symmetry broken: at exactly uniform routing the entropy term's
    gradient is zero, so a zero-initialised router would leave confident routing to chance."""
    nn.init.normal_(router.weight, std=std)
    nn.init.zeros_(router.bias)


class ExpertBank(nn.Module):
    """E LoRA experts of one projection, stacked; ranks padded to r_max with a mask."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        ranks: list[int],
        scalings: list[float],
        init_lora_weights: bool | str = True,
        device=None,
        dtype=None,
    ):
        super().__init__()
        if not ranks:
            raise ConfigError("a LoRA-Mixer needs at least one expert.")
        for e, r in enumerate(ranks):
            if not isinstance(r, int) or r < 0:
                raise ConfigError(f"expert {e}: rank must be a non-negative integer, got {r!r}.")
        E, r_max = len(ranks), max(max(ranks), 1)
        self.in_features, self.out_features = in_features, out_features
        factory = {"device": device, "dtype": dtype}
        self.A = nn.Parameter(torch.zeros(E, r_max, in_features, **factory))
        self.B = nn.Parameter(torch.zeros(E, out_features, r_max, **factory))
        mask = torch.zeros(E, r_max, **factory)
        for e, r in enumerate(ranks):  # rank 0: the expert has no LoRA here (PEFT experts may skip modules)
            mask[e, :r] = 1.0
        self.register_buffer("rank_mask", mask)
        self.register_buffer(
            "scaling", torch.tensor([s if r else 0.0 for r, s in zip(ranks, scalings)], **factory)
        )
        with torch.no_grad():
            for e, r in enumerate(ranks):
                if r:
                    init_lora_pair(self.A[e, :r], self.B[e, :, :r], init_lora_weights, r)

    @torch.no_grad()
    def set_expert(self, expert: int, lora_a: torch.Tensor, lora_b: torch.Tensor) -> None:
        """Copy one expert's LoRA (A (r, in), B (out, r)) in, exactly."""
        r = int(self.rank_mask[expert].sum().item())
        if tuple(lora_a.shape) != (r, self.in_features) or tuple(lora_b.shape) != (self.out_features, r):
            raise ConfigError(
                f"expert {expert}: LoRA shapes A {tuple(lora_a.shape)}, B {tuple(lora_b.shape)} do not fit a "
                f"rank-{r} expert on a {self.in_features} -> {self.out_features} projection."
            )
        self.A[expert, :r] = lora_a.to(self.A.dtype)
        self.B[expert, :, :r] = lora_b.to(self.B.dtype)

    def snapshot(self) -> None:
        """Remember the current expert weights as theta_0 for the preservation penalty."""
        self.register_buffer("A0", self.A.detach().clone(), persistent=False)
        self.register_buffer("B0", self.B.detach().clone(), persistent=False)

    def preservation(self) -> torch.Tensor:
        """||theta - theta_0||^2 over this projection's experts (0 before any snapshot)."""
        if getattr(self, "A0", None) is None:
            return torch.zeros((), device=self.A.device)
        return (self.A - self.A0).square().sum() + (self.B - self.B0).square().sum()

    @property
    def num_experts(self) -> int:
        return self.A.shape[0]

    @torch.no_grad()
    def prototypes(self) -> torch.Tensor:
        """Arrow's prototypes (E, in): each expert's top right singular vector of B_e A_e, exactly (the
        SVD of R A_e with B_e = Q R, never the out x in matrix; sign-free, as Arrow takes |x . v|), cached
        until the experts' weights change. An expert absent here (rank 0) has a zero prototype."""
        version = (self.A._version, self.B._version, self.A.data_ptr(), self.B.data_ptr())
        cached = getattr(self, "_prototypes", None)
        if cached is not None and cached[0] == version:
            return cached[1]
        vectors = torch.zeros(self.num_experts, self.in_features, dtype=self.A.dtype, device=self.A.device)
        for e in range(self.num_experts):  # once per weight change, not per call
            r = int(self.rank_mask[e].sum().item())
            if r == 0:
                continue
            a, b = self.A[e, :r].double(), self.B[e, :, :r].double()
            _, upper = torch.linalg.qr(b)
            _, _, vh = torch.linalg.svd(upper @ a, full_matrices=False)
            vectors[e] = vh[0].to(vectors.dtype)
        self._prototypes = (version, vectors)
        return vectors

    def per_sample(self, x: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """Hard routing: x (batch, tokens, in), experts (batch,) -> s_e B_e A_e x with e = experts[sample],
        (batch, tokens, out). Only the sample's own expert runs (``lora_per_row``, the kernel packed grid
        cells use), so it costs one expert's arithmetic, not E experts' masked to one."""
        a = self.A * self.rank_mask.unsqueeze(-1)  # ranks below r_max: the padded rows never act
        return lora_per_row(x, a, self.B, self.scaling, experts)

    def forward(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x (N, in), weights (N, E) -> sum_e weights_e s_e B_e A_e x, (N, out)."""
        E, r = self.A.shape[:2]
        h = (x @ self.A.reshape(E * r, -1).T).view(-1, E, r)  # A_e x for every expert: one GEMM
        h = h * (weights.to(h.dtype) * self.scaling).unsqueeze(-1) * self.rank_mask
        return h.reshape(-1, E * r) @ self.B.permute(0, 2, 1).reshape(E * r, -1)  # one GEMM


class LoRAMixerLinear(AdapterLayer):
    """A frozen linear layer plus routed LoRA experts, per adapter name."""

    adapter_weights = ("experts", "router")
    adapter_extras = ()

    def __init__(self, base_layer: nn.Module, fan_in_fan_out: bool = False):
        super().__init__(base_layer)
        self.fan_in_fan_out = fan_in_fan_out
        self.in_features, self.out_features = weight_dims(base_layer.weight, fan_in_fan_out)
        self.experts = nn.ModuleDict()
        self.router = nn.ModuleDict()  # own routers; shared ones are referenced in _shared_routers
        self._shared_routers: dict[str, nn.Module] = {}
        self._routing: dict[str, RoutingState] = {}
        self.trainable_parts: dict[str, set[str]] = {}  # per adapter: subset of {"experts", "router"}

    def update_layer(
        self, name: str, experts: ExpertBank, state: RoutingState, router: nn.Module | None = None
    ) -> None:
        """Add adapter ``name``. ``router`` None creates this projection's own router."""
        if (experts.in_features, experts.out_features) != (self.in_features, self.out_features):
            raise ConfigError(
                f"expert bank is {experts.in_features} -> {experts.out_features} but the projection is "
                f"{self.in_features} -> {self.out_features}."
            )
        self.experts[name] = experts
        if router is None:
            weight = self.base_layer.weight
            own = nn.Linear(
                self.in_features, experts.num_experts, device=weight.device, dtype=adapter_dtype(weight)
            )
            init_router(own)
            self.router[name] = own
        else:
            self._shared_routers[name] = router
        self._routing[name] = state
        self.trainable_parts[name] = {"experts", "router"}

    def delete_adapter(self, name: str) -> None:
        super().delete_adapter(name)
        self._shared_routers.pop(name, None)
        self._routing.pop(name, None)
        self.trainable_parts.pop(name, None)

    def trainable_adapter_parameters(self, name: str):
        parts = self.trainable_parts.get(name, set())
        if "experts" in parts and name in self.experts:
            yield from self.experts[name].parameters()
        if "router" in parts and name in self.router:
            yield from self.router[name].parameters()

    def router_for(self, name: str) -> nn.Module:
        return self.router[name] if name in self.router else self._shared_routers[name]

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disabled:
            return result
        lead = x.shape[:-1]
        batch = x.shape[0] if x.dim() > 1 else 1
        tokens = math.prod(lead) // batch if lead else 1
        for name in self.active_adapters:
            experts, state = self.experts[name], self._routing[name]
            if state.task_ids is not None:
                if state.record:  # no router ran: the losses skip it, inspection sees the one-hot routing
                    state.records.append((None, route(None, state, batch, tokens), tokens))
                task_ids = sample_task_ids(state.task_ids, batch)
                delta = experts.per_sample(x.reshape(batch, tokens, self.in_features), task_ids)
                result = result + delta.view(*lead, self.out_features).to(result.dtype)
                continue
            flat = x.reshape(-1, self.in_features).to(experts.A.dtype)
            needs_router = state.routing in ("soft", "topk")  # hard routing took the branch above
            logits = None
            if state.routing == "arrow":
                logits = (flat @ experts.prototypes().T).abs()  # (N, E), no router
            elif needs_router and state.pooling == "sample":
                logits = pooled_logits(self, self.router_for(name), flat, state, batch, tokens)
            elif needs_router:
                logits = self.router_for(name)(flat)
            weights = route(logits, state, batch, tokens).to(flat.device)
            if state.record:
                probs = torch.softmax(logits.float() / state.temperature, dim=-1) if needs_router else None
                state.records.append((probs, weights.detach(), tokens))
            delta = experts(flat, weights).view(*lead, self.out_features)
            result = result + delta.to(result.dtype)
        return result


def real_tokens(state: RoutingState, rows: int) -> torch.Tensor | None:
    """The call's non-padding rows as a (rows,) bool mask, or None when every row counts (no mask,
    or a mask of another call's shape, as in cached generation where a call sees one new token)."""
    mask = state.token_mask
    if mask is None or mask.numel() != rows:
        return None
    return mask.reshape(-1).to(torch.bool)


def routing_label_loss(state: RoutingState) -> torch.Tensor:
    """Ours: mean over the recorded router calls of CE(each sample's router probabilities averaged
    over its real (non-padding) tokens, the sample's task label). Zero without labels or routers."""
    labels = state.task_labels
    with_router = [(p, tokens) for p, _, tokens in state.records if p is not None]
    if labels is None or not with_router:
        return torch.zeros(())
    total = torch.zeros((), device=with_router[0][0].device)
    for p, tokens in with_router:
        keep = real_tokens(state, p.shape[0])
        real = torch.ones(p.shape[0], device=p.device) if keep is None else keep.to(p.dtype)
        real = real.view(-1, tokens, 1)  # (batch, tokens, 1)
        per_sample = (p.view(-1, tokens, p.shape[-1]) * real).sum(1) / real.sum(1).clamp_min(1)  # (batch, E)
        if per_sample.shape[0] != labels.shape[0]:
            raise ConfigError(
                f"task_labels has {labels.shape[0]} entries but the batch has {per_sample.shape[0]} samples; "
                "give one task label per sample."
            )
        total = total - per_sample.clamp_min(1e-12).log().gather(1, labels.view(-1, 1)).mean()
    return total / len(with_router)


def gate_balance_loss(state: RoutingState) -> torch.Tensor:
    """MoLE's gate balancing loss, -sum_i log q_i with q_i the mean gate of expert i over the call's real
    tokens, averaged over the recorded router calls: smallest (E log E) when every expert keeps an equal
    share, so no expert's gate collapses to zero."""
    with_router = [p for p, _, _ in state.records if p is not None]
    if not with_router:
        return torch.zeros(())
    total = torch.zeros((), device=with_router[0].device)
    for p in with_router:
        keep = real_tokens(state, p.shape[0])
        q = (p[keep] if keep is not None else p).mean(0)
        total = total - q.clamp_min(1e-12).log().sum()
    return total / len(with_router)


def routing_aux_loss(state: RoutingState, balance: float, specialization: float) -> torch.Tensor:
    """alpha * sum_i pbar_i fbar_i  +  lambda * E_x[H(p(x))], averaged over the recorded layer calls.

    pbar_i: mean router probability of expert i. fbar_i: share of tokens routed to expert i — each
    token's top-1 expert under soft routing, its renormalised top-k weights under topk. Minimising
    the first term balances the experts. The entropy term is ADDED (the paper prints a minus, which
    would maximise per-token entropy against its stated goal of specialised routing): minimising it
    makes each token's routing confident. Nothing is recorded under hard or uniform routing.
    Padding tokens (``state.token_mask``, from the attention mask) take no part.
    """
    with_router = [(p, w) for p, w, _ in state.records if p is not None]
    if not with_router:
        return torch.zeros(())
    total = torch.zeros((), device=with_router[0][0].device)
    for p, w in with_router:
        keep = real_tokens(state, p.shape[0])
        if keep is not None:
            p, w = p[keep], w[keep]
        E = p.shape[-1]
        assigned = w.float() if state.routing == "topk" else F.one_hot(p.argmax(-1), E).float()
        pbar, fbar = p.mean(0), assigned.mean(0)
        entropy = -(p * torch.log(p.clamp_min(1e-12))).sum(-1).mean()
        total = total + balance * (pbar * fbar).sum() + specialization * entropy
    return total / len(with_router)
