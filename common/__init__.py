"""The ground every stage stands on: teacher and tokenizer resolution (``teacher``), corpus readers
(``corpus``, ``corpus_sources``, ``corpus_cuts``) and stage-1 tasks (``partition``) over local paths or
object storage (``storage``, ``urls``), the command-line contract (``cli``). It imports nothing of this
project above it (docs/architecture.md); ``cli`` is standard library only, so the trainer may use it."""
