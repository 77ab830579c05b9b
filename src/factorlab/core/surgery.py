"""Model surgery's pieces that need no AdaptedModel: replacing a submodule, which modules an adapter
trains as copies, names an adapter may take, and models that must not be adapted again."""

from __future__ import annotations

import re
import warnings

from torch import nn

from factorlab.core.method import TASK_HEADS, AdapterConfig
from factorlab.errors import ConfigError, TargetError
from factorlab.layers.base import AdapterLayer
from factorlab.peft_format import HEAD_CLASSES


def replace_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def modules_to_save(base: nn.Module, method, config: AdapterConfig, targets: list[str]) -> list[str]:
    names: list[str] = []

    def matching(wanted) -> list[str]:
        return [
            n for n, _ in base.named_modules() if n and any(n == w or n.endswith("." + w) for w in wanted)
        ]

    if config.modules_to_save:
        names = matching(config.modules_to_save)
        if not names:
            raise TargetError(f"modules_to_save={config.modules_to_save!r} matched no module of this model.")
    heads = TASK_HEADS.get(config.task_type or "", ())
    if heads:
        found = [n for n in matching(heads) if n not in names]
        if not found and not names:
            raise TargetError(
                f"task_type={config.task_type!r} trains the head {' or '.join(heads)}, but this "
                f"{type(base).__name__} has none; name it in modules_to_save "
                "or drop task_type."
            )
        names += found
    if method.extra_modules_to_save is not None:
        names += [n for n in method.extra_modules_to_save(base, config) if n not in names]
    clash = sorted(set(names) & set(targets))
    if clash:
        raise TargetError(f"{clash[:3]} are both adapter targets and modules_to_save; choose one.")
    return names


def warn_untrained_head(base: nn.Module, config: AdapterConfig, trained: list[str]) -> None:
    """A task head is freshly initialised by from_pretrained; left frozen it stays random (PEFT's
    task_type exists for this). Say so instead of training a model that cannot learn its task."""
    cls = type(base).__name__
    task = next((t for suffix, t in HEAD_CLASSES.items() if cls.endswith(suffix)), None)
    if task is None or config.task_type == task:
        return
    heads = [n for n, _ in base.named_modules() if n.split(".")[-1] in TASK_HEADS[task]]
    if heads and not any(h == t or h.startswith(t + ".") for h in heads for t in trained):
        warnings.warn(
            f"{cls}: its head {heads[0]!r} is not trained by this adapter and stays as initialised; pass "
            f"task_type={task!r} (or modules_to_save={[heads[0].split('.')[-1]]!r}) to train it.",
            stacklevel=3,
        )


ADAPTER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")


def check_adapter_name(name: object) -> None:
    """Adapter names become keys of module dicts and folder names: letters, digits, '_' and '-', not
    a path, not a dunder, not an attribute that a module already has (``forward``, ``training``)."""
    if not isinstance(name, str) or not ADAPTER_NAME.fullmatch(name):
        raise ConfigError(
            f"adapter name {name!r} is not allowed: use 1-64 letters, digits, '_' or '-', starting with a "
            "letter or digit (no '/', '.', spaces), e.g. 'math' or 'task_1'."
        )
    if hasattr(nn.ModuleDict(), name):
        raise ConfigError(
            f"adapter name {name!r} is a torch module attribute; pick another, e.g. '{name}_1'."
        )


def refuse_adapted(model: nn.Module) -> None:
    peft_layers = [type(m).__name__ for m in model.modules() if type(m).__module__.startswith("peft.")]
    if peft_layers:
        raise ConfigError(
            f"this model is wrapped by PEFT (it holds {sorted(set(peft_layers))[:3]}); adapting it would "
            "wrap "
            "PEFT's own layers. Pass the plain base model, or load the PEFT adapter folder with "
            "factorlab.AdaptedModel.from_pretrained(base, folder)."
        )
    if any(isinstance(m, AdapterLayer) for m in model.modules()):
        raise ConfigError(
            "this model already holds factorlab adapter layers (from another AdaptedModel); use that "
            "AdaptedModel's add_adapter(), or unload() it first."
        )
