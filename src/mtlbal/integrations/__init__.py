"""Integrations with training frameworks.

Each submodule imports its framework when it is itself imported, never before: ``import mtlbal``
and ``import mtlbal.integrations`` need none of them.

- :mod:`mtlbal.integrations.lightning`: Lightning (``lightning.pytorch`` or
  ``pytorch_lightning``), automatic and manual optimization.
- :mod:`mtlbal.integrations.huggingface`: a ``transformers.Trainer`` that balances the losses a
  model returns, and an ``accelerate`` recipe.
"""

__all__: list[str] = []
