"""The training runtime (``python -m ftcluster.train``): the only package that imports torch,
transformers, peft and deepspeed. See docs/training.md."""
