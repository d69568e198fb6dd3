"""Integrations with training stacks (optional dependencies, imported on demand).

- :mod:`nextoffline.integrations.trl`: ``ExtrapolationCallback``, a ``transformers.TrainerCallback``
  that extrapolates inside a running TRL / Hugging Face ``Trainer`` with a PEFT LoRA model.
- :mod:`nextoffline.integrations.watch`: wait for a trainer's checkpoint, then extrapolate it
  (``nextoffline watch``).
"""

__all__: list[str] = []
