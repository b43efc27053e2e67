"""Whole-system recipes: the sequence stage 1 -> SAE -> stage 2 -> students -> curves, written once
(``recipes/steps.py``), and the two programs that run it:

- ``python -m recipes.demo`` (``make demo``): the whole system on the embedded default, in one run directory;
- ``python -m recipes.efficiency --config recipes/configs/cpu.json``: the paper's token-efficiency experiment.

This package sits above every other one (docs/architecture.md): it calls each stage's ``run(config)``
with that stage's config dataclass (``pipeline.stage1``, ``sae.train``, ``pipeline.extract``,
``trainer.loop``), and nothing below imports it.
"""
