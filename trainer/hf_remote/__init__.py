"""Resource files that ``python -m trainer.export`` copies into a CoCoMix export directory, where
transformers imports them through ``trust_remote_code=True`` (docs/export.md).

They are the student's architecture written for transformers (``PreTrainedModel`` + ``GenerationMixin``),
self-contained: they import torch and transformers and each other, never this project, because the
export directory must load where the project is not installed. Nothing in trainer/ imports them (the
trainer never imports transformers model classes: tests/test_architecture.py); tests/test_export.py
checks that their logits equal trainer/model.py's.
"""
