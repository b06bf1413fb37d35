"""Named bundles of training settings. A preset fills in what the command line leaves out;
every explicit flag wins over it.

* smoke - seconds, for tests: a few hundred images, 2 epochs, fp32.
* demo  - the main job on a 2-core CPU: up to 10k training images x 12 epochs, evaluation every 4
          epochs on the full test set, sized to train in 8 minutes on this machine (`time_budget`: a
          few timed steps decide how many images an epoch holds; a 2-core EPYC with bf16 takes all 10k).
* cpu   - hours on a 2-core CPU: 30 epochs one-cycle, max lr 0.1, Nesterov, wd 5e-4, batch 256
          (dense VGG-16 reaches 92.4 % in ~106 min on a 2-core EPYC in bf16).
* paper - the literature's GPU schedule: 200 epochs, batch 64, lr 0.1 divided by 10 at 50 % and 75 %,
          wd 1e-4.

Precision is not a preset's business: bf16 autocast is used where the hardware has bf16 arithmetic
(compress/hardware.py), fp32 elsewhere; `--bf16/--no-bf16` decide explicitly.
"""
from __future__ import annotations

PRESETS: dict[str, dict] = {
    "smoke": dict(epochs=2, batch_size=64, lr=0.05, schedule="onecycle", nesterov=True, weight_decay=5e-4,
                  bf16=False, train_subset=512, test_subset=256, calib=64, eval_every=1),
    "demo": dict(epochs=12, batch_size=128, lr=0.1, schedule="onecycle", nesterov=True, weight_decay=5e-4,
                 train_subset=10000, test_subset=None, calib=1024, eval_every=4, time_budget=8.0),
    "cpu": dict(epochs=30, batch_size=256, lr=0.1, schedule="onecycle", nesterov=True, weight_decay=5e-4,
                train_subset=None, test_subset=None, calib=1024, eval_every=1),
    "paper": dict(epochs=200, batch_size=64, lr=0.1, schedule="step", nesterov=False, weight_decay=1e-4,
                  train_subset=None, test_subset=None, calib=1024, eval_every=1),
}

DEFAULT_PRESET = "cpu"
