"""The CoCoMix student trainer: model, objectives, shard loader, training loop, generation.

Imports nothing heavy at package level: ``trainer.run`` must not pull in ``transformers`` model
classes, ``pipeline`` or ``sae`` (the teacher is never loaded while training).
"""
