"""Calibration: policies (bits, scales, exits) fitted on a few labelled images.

One module per method. Modules that need gradients (LampQ's Fisher information) import torch
inside their functions; the exit-threshold tools work from the runtime alone.

* :mod:`.thresholds` -- exit thresholds from collected exit logits (numpy only).
* :mod:`.ilp` -- the multiple-choice knapsack allocator (``solve(choices, budget, weights)``,
  exact, ``scipy.optimize.milp``), shared by LampQ and the exit-aware methods.
* :mod:`.lampq` -- LampQ: type-aware Fisher sensitivity + ILP + refinement rounds.
* :mod:`.fisher` -- exact per-sample Fisher traces of the linear layers.
* :mod:`.scalepredictor` -- ScalePredictor: per-image activation scales from a shallow
  block's range statistic (the runtime's own), polynomial degree chosen on held-out images.
* :mod:`.uniform`, :mod:`.static`, :mod:`.naive` -- baselines: uniform bits, static
  (min-max / percentile) activation scales, bits by weight range under the same ILP.
* :mod:`.common` -- calibration images (the reference's Fashion-MNIST, or the user's folder /
  ``.npz`` kept as uint8 and normalised per batch), the model source (the reference, or any
  timm ViT ``convert`` accepts, with its exit heads), BOPs/bytes cost model;
  :mod:`.emulate` -- the runtime's quantisation emulated on the torch model.
* :mod:`.routes` -- which validation images left at which exit / took which QuEE path.
* :mod:`.cli` -- ``pyruntime calibrate``.

Every method takes the attention precision (``attention`` / ``--attention``: 32 fp32, the
default, or 8 int8): it is emulated while measuring, written into the policy and costed
(:mod:`.common`).
"""
