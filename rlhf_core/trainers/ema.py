"""Exponential moving average of the actor's weights (DeepSpeed-Chat's ``--enable_ema``)."""

from __future__ import annotations

import torch

from rlhf_core.engines.training import iter_full_parameters


class EMA:
    """``ema = beta * ema + (1 - beta) * actor`` over every parameter, after each actor step.

    The average lives on rank 0 only, in float32 (a bf16 average would lose increments of (1 - beta)
    times a small change), on the accelerator or, with ``on_cpu``, in host memory. Under ZeRO-3 every rank
    joins the per-parameter gather; only rank 0 keeps the result.
    """

    def __init__(self, module: torch.nn.Module, beta: float, zero3: bool, is_main: bool, on_cpu: bool = False):
        self.beta, self.zero3, self.is_main, self.on_cpu = beta, zero3, is_main, on_cpu
        self.shadow: dict[str, torch.Tensor] = {}
        for names, value in iter_full_parameters(module, zero3, want=is_main):
            if is_main:
                self.shadow[names[0]] = value.detach().to("cpu" if on_cpu else value.device, torch.float32).clone()

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        for names, value in iter_full_parameters(module, self.zero3, want=self.is_main):
            if self.is_main:
                shadow = self.shadow[names[0]]
                shadow.mul_(self.beta).add_(value.to(shadow.device, torch.float32), alpha=1.0 - self.beta)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.shadow

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if not self.is_main:
            return
        missing = self.shadow.keys() - state.keys()
        if missing:
            raise KeyError(f"EMA state lacks {sorted(missing)[:3]}")
        for name, shadow in self.shadow.items():
            shadow.copy_(state[name])

    def full_state_dict(self, module: torch.nn.Module) -> dict[str, torch.Tensor]:
        """The averaged weights under every parameter name (tied names included), for export."""
        out = {}
        groups: dict[int, list[str]] = {}
        for name, param in module.named_parameters(remove_duplicate=False):
            groups.setdefault(id(param), []).append(name)
        for names in groups.values():
            for n in names:
                out[n] = self.shadow[names[0]].detach().cpu()
        return out
