"""The seed method's knobs and their defaults: the one place they live (torch-free, so the CLI can
show and check them without loading torch). The method itself is compress/prune/seed.py, whose
docstring says what each knob means and why its default is what it is."""
from __future__ import annotations

import math
from dataclasses import dataclass

from compress.errors import UserError
from compress.prune.targets import check_target

REDISTRIBUTE_BY = ("utility", "utility-ratio", "utility-per-cost")
BUDGET_INIT = ("global", "uniform")

# The schedule's defaults as shares of the pruning phase's steps (and whole epochs to settle), and
# whether switched-off channels fade out (soft) or drop at once. Chosen by measurement (VGG-16,
# -90 % FLOPs, 4 epochs; BENCHMARKS.md "Seed method: the schedule"): pruning early and fading out
# gave 79.1 % top-1 where the previous defaults (warm-up 0.25, one cut, end 0.75) gave 75.0 %.
SCHEDULE = {"warmup": 0.05, "ramp": 0.15, "end": 0.25, "settle_epochs": 1, "soft": True}


@dataclass
class SeedConfig:
    metric: str = "flops"            # "flops" or "params"
    reduction: float = 0.5           # target reduction of `metric`, in (0, 1)
    smoothing: float = 0.9           # eps in u <- eps*u + (1-eps)*Theta
    warmup_steps: int = 0            # steps with every channel on
    ramp_steps: int = 0              # steps over which the target ramps in (0: all at once)
    update_every: int = 10           # steps between mask updates
    redistribute_every: int = 0      # steps between budget redistributions (0: never)
    redistribute: float = 0.1        # s: share of a donor layer's spare channels moved per redistribution
    min_keep: float = 0.1            # minimum width: share of a layer's channels (at least 1)
    freeze_at: int | None = None     # last step at which masks may change (None: never frozen)
    settle_steps: int = 0            # steps trained on the final masks before the cut
    cost_power: float = 0.0          # rank channels by utility / resource**cost_power (budget.select)
    redistribute_by: str = "utility"  # layer significance xi (module docstring)
    round_to: int = 1                # kept widths in multiples of this (budget.select)
    soft: bool = False               # switched-off channels fade out until freeze_at
    also: dict | None = None         # a joint target: {other metric: its reduction}, met as well
    hysteresis: float = 0.0          # a kept channel's utility counts (1 + this) when masks are recomputed
    budget_init: str = "global"      # the layer budgets a^l until the target is reached: global ranking or uniform

    def __post_init__(self):
        check_target(self.metric, self.reduction)
        for m, r in (self.also or {}).items():
            check_target(m, r)
        if self.redistribute_by not in REDISTRIBUTE_BY:
            raise UserError(f"redistribute_by (--redistribute-by) must be one of {', '.join(REDISTRIBUTE_BY)}, "
                            f"got {self.redistribute_by!r}")
        if self.budget_init not in BUDGET_INIT:
            raise UserError(f"budget_init (--prune-budget-init) must be one of {', '.join(BUDGET_INIT)}, "
                            f"got {self.budget_init!r}")
        if self.update_every < 1:
            raise UserError(f"update_every (--prune-every), the steps between mask updates, must be >= 1, "
                            f"got {self.update_every}")
        if isinstance(self.redistribute_every, bool) or not isinstance(self.redistribute_every, int) \
                or self.redistribute_every < 0:
            raise UserError(f"redistribute_every (--redistribute-every), the steps between budget redistributions, "
                            f"must be a whole number >= 0 (0: never), got {self.redistribute_every!r}")
        if not 0 <= self.smoothing < 1:
            raise UserError(f"smoothing (--prune-smoothing), the utility smoothing eps, must be in [0, 1), "
                            f"got {self.smoothing}")
        if not 0 <= self.hysteresis <= 10:
            raise UserError(f"hysteresis (--prune-hysteresis) must be in [0, 10] (0.2: a channel must beat a "
                            f"kept one by 20 %), got {self.hysteresis}")
        if not 0 <= self.redistribute < 1:
            raise UserError(f"redistribute (--redistribute), s, the share of channels redistributed, must be in "
                            f"[0, 1), got {self.redistribute}")
        if not 0 < self.min_keep <= 1:
            raise UserError(f"min_keep (--min-keep), the minimum width, must be a share in (0, 1], got {self.min_keep}")
        if self.soft and self.freeze_at is None:
            raise UserError("soft masks fade out until the freeze: give freeze_at")

    @classmethod
    def for_run(cls, metric: str, reduction: float, epochs: int, steps_per_epoch: int, *,
                warmup: float | None = None, ramp: float | None = None, end: float | None = None,
                settle_epochs: int | None = None, soft: bool | None = None, **fields) -> SeedConfig:
        """The config for a pruning phase of `epochs` x `steps_per_epoch`: the schedule's shares
        (None: `SCHEDULE`'s defaults) turned into steps, redistribution once per epoch; `fields`
        set the other knobs. Raises UserError when the schedule does not fit the budget."""
        s = {"warmup": warmup, "ramp": ramp, "end": end, "settle_epochs": settle_epochs, "soft": soft}
        s = {k: SCHEDULE[k] if v is None else v for k, v in s.items()}
        if not 0 <= s["warmup"] < s["end"] <= 1 or not 0 <= s["ramp"] <= s["end"] - s["warmup"]:
            raise UserError(f"the seed schedule needs 0 <= warm-up < warm-up + ramp <= end <= 1 (shares of the "
                            f"budget; --prune-warmup, --prune-ramp, --prune-end), got warm-up {s['warmup']}, "
                            f"ramp {s['ramp']}, end {s['end']}")
        if isinstance(s["settle_epochs"], bool) or not isinstance(s["settle_epochs"], int) or s["settle_epochs"] < 0:
            raise UserError(f"settle (--prune-settle) must be a whole number of epochs >= 0, "
                            f"got {s['settle_epochs']!r}")
        total = epochs * steps_per_epoch
        settle = s["settle_epochs"] * steps_per_epoch
        warmup_steps = int(round(s["warmup"] * total))
        freeze_at = min(int(round(s["end"] * total)), total - settle)
        if freeze_at <= warmup_steps:
            raise UserError(f"a budget of {epochs} epoch(s) is too short for this seed schedule: the masks would "
                            f"freeze (step {freeze_at}) before the warm-up ends (step {warmup_steps}); "
                            f"give more epochs or a shorter warm-up/settle")
        ramp_steps = min(int(round(s["ramp"] * total)), freeze_at - warmup_steps)
        fields.setdefault("redistribute_every", steps_per_epoch)
        return cls(metric=metric, reduction=reduction, warmup_steps=warmup_steps, ramp_steps=ramp_steps,
                   freeze_at=freeze_at, settle_steps=settle, soft=bool(s["soft"]), **fields)

    def extract_epoch(self, steps_per_epoch: int) -> int:
        """The number of epochs after which the network is cut: the first epoch boundary at least
        `settle_steps` after the freeze."""
        return math.ceil((self.freeze_at + self.settle_steps) / steps_per_epoch)


def seed_options(cfg) -> dict:
    """The seed method's knobs given on the command line (a compress.cli RunConfig), as
    SeedConfig.for_run's keywords; the ones not given take this module's defaults."""
    given = {"warmup": cfg.prune_warmup, "ramp": cfg.prune_ramp, "end": cfg.prune_end,
             "settle_epochs": cfg.prune_settle, "smoothing": cfg.prune_smoothing, "update_every": cfg.prune_every,
             "redistribute": cfg.redistribute, "redistribute_by": cfg.redistribute_by, "soft": cfg.soft_masks,
             "redistribute_every": cfg.redistribute_every,
             "hysteresis": cfg.prune_hysteresis, "budget_init": cfg.prune_budget_init}
    return {k: v for k, v in given.items() if v is not None}
