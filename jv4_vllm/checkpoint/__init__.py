"""Checkpoint tools (need the ``model`` extra for torch): merge each task's LoRA into its own
vLLM-ready checkpoint, and build the tiny demo checkpoint the tests and demo use."""
