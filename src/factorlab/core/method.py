"""The Method contract: everything an adaptation method provides to the core, in one place, and the
open registry of methods.

Unlike PEFT's closed enum, any package can register a method: a config dataclass (a subclass of
``AdapterConfig`` with a ``method`` name), an ``AdapterLayer`` subclass (factorlab.layers.base) and a
``Method`` naming the hooks below. The core (``factorlab.core.adapted``) calls only these hooks; it never
branches on a method's name, and every message that names a method comes from the method.

Required: ``name``, ``config_cls``, ``layer_cls``, ``build_layer``, ``default_roles``. Every other hook
is optional, with the default stated beside it. Targets reach ``accepts`` and ``build_layer`` unwrapped:
when another adapter already wraps a module, the core passes the original module (``base_layer``).
A complete method in about 60 lines is in the README ("Write your own method") and runs as a test.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from torch import nn

from factorlab.errors import ConfigError, PeftOnlyError
from factorlab.layers.base import AdapterLayer

TaskType = Literal["CAUSAL_LM", "SEQ_2_SEQ_LM", "SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION"]
# The heads PEFT trains as modules_to_save for a task type (those the model has).
TASK_HEADS: dict[str, tuple[str, ...]] = {
    "SEQ_CLS": ("classifier", "score"),
    "TOKEN_CLS": ("classifier", "score"),
    "QUESTION_ANS": ("qa_outputs",),
}


@dataclass
class AdapterConfig:
    """Targeting fields shared by every method (PEFT's names and meaning)."""

    method: ClassVar[str] = ""

    target_modules: list[str] | str | None = None
    """Module names (exact or suffix after a dot), a regex over full names, or "all-linear".
    None means the method's default roles."""
    target_roles: list[str] | None = None
    """Architecture-independent roles, e.g. ["attn_in", "attn_out", "ffn_out"] (factorlab.core.targeting)."""
    exclude_modules: list[str] | str | None = None
    """Modules never adapted, same matching rules as target_modules."""
    layers_to_transform: list[int] | None = None
    """Only adapt modules of these layer indices."""
    modules_to_save: list[str] | None = None
    """Whole modules (names, same matching) trained as copies along with the adapter and saved with it."""
    task_type: TaskType | None = None
    """PEFT's task type. SEQ_CLS / TOKEN_CLS add the head ("classifier" or "score") and QUESTION_ANS
    "qa_outputs" to modules_to_save, as PEFT does, so a freshly initialised head trains; it is also
    written to saved PEFT-format folders, where PEFT picks its model class by it."""
    inference_mode: bool = field(default=False, repr=False)

    # PEFT's get/set_peft_model_state_dict read these first, then walk PEFT's own layer classes, which a
    # factorlab model does not have: instead of an AttributeError deep inside PEFT, name the equivalent.
    @property
    def is_prompt_learning(self) -> bool:
        raise PeftOnlyError(_PEFT_STATE_DICT)

    @property
    def peft_type(self) -> str:
        raise PeftOnlyError(_PEFT_STATE_DICT)

    def to_dict(self) -> dict[str, Any]:
        out = {"method": self.method}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AdapterConfig:
        data = {k: v for k, v in data.items() if k != "method"}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"{cls.__name__} has no field(s) {unknown}; known fields: {sorted(known)}.")
        return cls(**data)


_PEFT_STATE_DICT = (
    "peft.get_peft_model_state_dict / set_peft_model_state_dict work on PEFT's own layers; for a factorlab "
    "AdaptedModel use factorlab.get_peft_model_state_dict / factorlab.set_peft_model_state_dict (same "
    "arguments, same keys)."
)

# (target module, config, adapter name, module name, existing layer or None, shared weights or None)
LayerBuilder = Callable[
    [nn.Module, AdapterConfig, str, str, "AdapterLayer | None", "nn.Module | None"], AdapterLayer
]


@dataclass(frozen=True)
class Method:
    name: str
    config_cls: type[AdapterConfig]
    layer_cls: type[AdapterLayer]
    build_layer: LayerBuilder
    """(target, config, adapter name, module name, existing layer or None, shared or None) -> layer."""
    default_roles: Callable[[str | None], Sequence[str]]
    """Roles adapted when the config names no targets, given the model family."""
    build_shared: Callable[[nn.Module, AdapterConfig, list[str], bool], nn.Module | None] | None = None
    """(base model, config, target names, loading) -> weights shared by all of the adapter's layers, or
    None. ``loading`` is True when the adapter is being loaded from a file whose weights are copied in
    right after: a method may then build from recorded shapes alone (e.g. weights it once read from
    other folders, which may have moved since)."""
    shared_trainable_parameters: Callable[[nn.Module], Iterable[nn.Parameter]] | None = None
    """(the shared module) -> those of its parameters that train (None: all of them)."""
    extra_modules_to_save: Callable[[nn.Module, AdapterConfig], list[str]] | None = None
    """(base model, config) -> names of further modules trained as copies (e.g. LayerNorms)."""
    in_place_parameters: Callable[[nn.Module, AdapterConfig, list[str]], list[str]] | None = None
    """(base model, config, target names) -> base-model parameters that train in place and are saved
    with the adapter (PEFT's ``bias`` option); they are not restored when the adapter goes."""
    accepts: Callable[[nn.Module], bool] | None = None
    """Which modules the method can adapt (None: linear layers and GPT-2's Conv1D). It sees the original
    module, never another adapter's wrapper."""
    accepted_kinds: str = "nn.Linear or Conv1D layers"
    """Those modules in words, for the error when a target is something else."""
    forward_keywords: tuple[str, ...] = ()
    """Per-call keywords the method's adapters take in forward / generate (e.g. one id per sample)."""
    forward_context: Callable[[nn.Module, str, dict, bool], AbstractContextManager] | None = None
    """(adapted model, adapter name, call kwargs, record) -> a context manager around one forward or
    generate of the active adapter: it takes its ``forward_keywords`` out of kwargs, and yields a
    function that returns the call's auxiliary loss (or None when the method has none)."""
    param_kinds: tuple[tuple[str, str], ...] = ()
    """(substring of a parameter name, what it is) for print_trainable_parameters; first match wins."""
    combinable: bool = False
    """Whether several adapters of the method can be active at once (their updates add up)."""
    label: str = ""
    """How messages name the method; empty: its ``name``."""
    not_combinable_hint: str = ""
    """For a method that is not ``combinable``: what to use instead, in the refusal of ``set_adapter``
    with several of its adapters."""
    combine: Callable[..., None] | None = None
    """(adapted, adapters, weights, new name, combination_type, svd_rank) -> None: add_weighted_adapter."""
    peft_type: str | None = None
    """PEFT's name for the method, if PEFT has it: its folders are then written in PEFT's format (the
    config provides ``to_peft_dict(targets, task_type, fan_in_fan_out, portable)`` and reads PEFT's keys
    in ``from_dict``) and PEFT folders load."""


METHODS: dict[str, Method] = {}


def register_method(method: Method, replace: bool = False) -> Method:
    """Add ``method`` to the registry. A name already taken is refused unless ``replace=True``."""
    if not isinstance(method, Method):
        raise ConfigError(f"register_method takes a factorlab.Method, got {type(method).__name__}.")
    existing = METHODS.get(method.name)
    if existing is not None and existing is not method and not replace:
        raise ConfigError(
            f"adaptation method {method.name!r} is already registered (by {_owner(existing)}); pick another "
            "name, or pass replace=True to replace it."
        )
    METHODS[method.name] = method
    return method


def label(method: Method) -> str:
    return method.label or method.name


def _owner(method: Method) -> str:
    return method.config_cls.__module__


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ConfigError(f"unknown adaptation method {name!r}; registered: {sorted(METHODS)}.")
    return METHODS[name]


def forward_keywords() -> dict[str, list[str]]:
    """Every per-call keyword a registered method takes -> the methods that take it."""
    out: dict[str, list[str]] = {}
    for method in METHODS.values():
        for key in method.forward_keywords:
            out.setdefault(key, []).append(method.name)
    return out


@contextlib.contextmanager
def no_forward_state(
    adapted: nn.Module, adapter_name: str | None, kwargs: dict, record: bool
) -> Iterator[None]:
    """The forward context of methods without per-call state: another method's keyword is an error."""
    for key, owners in forward_keywords().items():
        if kwargs.pop(key, None) is not None:
            raise ConfigError(
                f"{key} only applies to an active {' or '.join(owners)} adapter; the active adapter is "
                f"{adapter_name!r}."
            )
    yield None


def method_for_peft_type(peft_type: object) -> Method | None:
    return next((m for m in METHODS.values() if m.peft_type is not None and m.peft_type == peft_type), None)


def config_from_dict(data: dict[str, Any]) -> AdapterConfig:
    if "method" not in data:
        raise ConfigError("adapter config has no 'method' field; is this a factorlab adapter?")
    return get_method(data["method"]).config_cls.from_dict(data)
