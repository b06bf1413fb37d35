"""Hard 0/1 channel masks on the forward pass, and the Taylor significance of each channel.

    masker = ChannelMasker(model, groups, record=True)
    masker.set(masks)                   # {group name: bool tensor}; None switches masking off
    masker.set(masks, off=0.3)          # switched-off channels scaled by 0.3 instead of 0 (soft masks)
    loss.backward()
    theta = masker.pop_taylor()         # {group name: float tensor}, this mini-batch's significance
    masker.remove()

The mask multiplies the output of every layer that produces a group's channels (`group.outputs`:
each BN carrying them, or a conv/Linear with no BN after it). So a masked channel is zero on
every branch of a residual sum and wherever it is read, exactly what cutting it removes.

Taylor significance (Molchanov et al. 2017, as the seed method uses it): for channel k,
Theta_k = mean over the batch of | sum over the producers and h,w of (dJ/dz_k) * z_k |, with z the
(masked) producer output, then divided by the group's largest value. The producers of a coupled
group are summed before the absolute value: that is the first-order change of the loss when the
channel disappears everywhere at once. It is read by a tensor hook on the hooked output, which
fires with the gradient of the value *before* any in-place activation that follows (ReLU_);
reading z after such a ReLU/ReLU6 changes nothing, since where the gradient flows the value
was not clipped. Sums are kept in float32 whatever the autocast dtype and memory format.

Create it after the model is on its device (its buffers are made there).
State is tensors (`self.sums`, `self.counts`), so a DDP trainer can all-reduce them, or pass
`reduce=` to `pop_taylor` to combine the batch means of all ranks before normalising.
"""
from __future__ import annotations

from typing import Callable, Mapping, Sequence

import torch
from torch import nn

from compress.prune.graph import ChannelGroup


class ChannelMasker:
    def __init__(self, model: nn.Module, groups: Sequence[ChannelGroup], record: bool = False):
        self.model = model
        self.groups = list(groups)
        self.record = record
        self.masks: dict[str, torch.Tensor] | None = None
        device = next(model.parameters()).device
        # Per producer module: (group index, positions in its channel axis, group channel of each).
        self._plan: dict[str, list[tuple[int, torch.Tensor, torch.Tensor]]] = {}
        for gi, group in enumerate(self.groups):
            for member in group.members:
                if member.kind == "out" and member.module in group.outputs:
                    self._plan.setdefault(member.module, []).append(
                        (gi, torch.tensor(member.idxs, device=device), torch.tensor(member.channels, device=device)))
        self._module_mask: dict[str, torch.Tensor] = {}  # full-width multiplier per producer
        self._partial: list[torch.Tensor | None] = [None] * len(self.groups)  # per-sample sums, this batch
        self.sums = [torch.zeros(g.size, device=device) for g in self.groups]  # accumulated Theta
        self.counts = torch.zeros(len(self.groups), device=device)
        modules = dict(model.named_modules())
        self._handles = [modules[name].register_forward_hook(self._make_hook(name)) for name in self._plan]

    # ------------------------------------------------------------------ masks

    def set(self, masks: Mapping[str, torch.Tensor] | None, off: float = 0.0) -> None:
        """Switch channels off (False) per group; groups not named stay whole. None: no masking.
        `off`: what a switched-off channel is multiplied by (0: gone, as cutting it does)."""
        if masks is None:
            self.masks, self._module_mask = None, {}
            return
        self.masks = {name: torch.as_tensor(m).bool() for name, m in masks.items()}
        by_name = {g.name: gi for gi, g in enumerate(self.groups)}
        full: dict[str, torch.Tensor] = {}
        modules = dict(self.model.named_modules())
        for module_name, plan in self._plan.items():
            width = _width(modules[module_name])
            vec = None
            for gi, positions, channels in plan:
                mask = self.masks.get(self.groups[gi].name)
                if mask is None:
                    continue
                if vec is None:
                    vec = torch.ones(width, device=positions.device)
                keep = mask.to(positions.device)[channels].float()
                vec[positions] = keep + (1.0 - keep) * off
            if vec is not None:
                full[module_name] = vec
        unknown = set(self.masks) - set(by_name)
        if unknown:
            raise KeyError(f"masks for unknown groups: {sorted(unknown)}")
        self._module_mask = full

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    # ------------------------------------------------------------------ hooks

    def _make_hook(self, module_name: str):
        def hook(module, inputs, output):
            mask = self._module_mask.get(module_name)
            if mask is not None:
                shape = (1, -1) + (1,) * (output.dim() - 2)
                # In place: the layers hooked (Conv2d, BN, Linear) do not need their output for
                # backward, and a second activation-sized tensor per layer per step costs time.
                output.mul_(mask.to(device=output.device, dtype=output.dtype).view(shape))
            if self.record and module.training and output.requires_grad:
                # Capture a detached view: a hook whose closure holds the very tensor it is registered
                # on makes a reference cycle through C++ that the garbage collector cannot see, and
                # every batch's activations leaked (60 MB per VGG-16 step).
                z = output.detach()
                output.register_hook(lambda grad: self._taylor(module_name, z, grad))
            return output
        hook.edgeslim_mask = True  # extract() drops hooks so marked from its copy
        return hook

    def _taylor(self, module_name: str, z: torch.Tensor, grad: torch.Tensor) -> None:
        with torch.no_grad():
            if grad.dim() > 2:   # (N, C): sum over h, w, accumulated in float32 whatever the dtype
                per_sample = (grad * z).flatten(2).sum(2, dtype=torch.float32)
            else:
                per_sample = grad.float() * z.float()
            for gi, positions, channels in self._plan[module_name]:
                contrib = torch.zeros(per_sample.shape[0], self.groups[gi].size, device=per_sample.device)
                contrib.index_add_(1, channels.to(per_sample.device), per_sample[:, positions.to(per_sample.device)])
                part = self._partial[gi]
                self._partial[gi] = contrib if part is None else part + contrib

    def pop_taylor(self, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """This batch's Theta per group (normalised by the group's max), added to the running sums.

        `reduce` gets all groups' batch means concatenated in one 1-D tensor (one all_reduce call)
        and must return the combined tensor (e.g. the mean over ranks). Groups that saw no gradient
        this batch are left out.
        """
        raw = []
        for gi, part in enumerate(self._partial):
            size = self.groups[gi].size
            raw.append(part.abs().mean(0) if part is not None else torch.zeros(size, device=self.counts.device))
        seen = torch.tensor([p is not None for p in self._partial], device=self.counts.device)
        self._partial = [None] * len(self.groups)
        if not self.groups:
            return {}
        flat = torch.cat([r.to(self.counts.device) for r in raw] + [seen.float()])
        if reduce is not None:
            flat = reduce(flat)
        out: dict[str, torch.Tensor] = {}
        offset = 0
        seen_flat = flat[-len(self.groups):]
        for gi, group in enumerate(self.groups):
            theta = flat[offset:offset + group.size]
            offset += group.size
            if seen_flat[gi] <= 0:
                continue
            peak = theta.max()
            theta = theta / peak if peak > 0 else theta
            self.sums[gi] += theta
            self.counts[gi] += 1
            out[group.name] = theta
        return out

    def accumulated(self) -> dict[str, torch.Tensor]:
        """Mean Theta per group over every batch popped so far (the Taylor criterion's score)."""
        return {g.name: self.sums[gi] / self.counts[gi].clamp(min=1) for gi, g in enumerate(self.groups)}


def _width(module: nn.Module) -> int:
    if isinstance(module, nn.Conv2d):
        return module.out_channels
    if isinstance(module, nn.Linear):
        return module.out_features
    return module.num_features
