"""The pipeline's stages: the registry (names, versions, inputs, settings, keys, outputs), the worker
entry (``launch``) and the stages that are not trainers (export, evaluation, a reward model from elsewhere)."""
