"""Small job specs the tests share (`from tests.support.specs import TINY_LORA`)."""

# The smallest valid LoRA job: a tiny random-init Llama, the shipped instruction data (relative to
# the repository root), a local output. Tests add or override fields on top of it.
TINY_LORA = """\
name: demo
method: lora
model:
  random_init: {preset: tiny}
data:
  train: examples/data/instruct.jsonl
  seq_len: 128
output:
  uri: file:///tmp/ftc-out
"""

# An 8B LoRA job at seq 8192, micro-batch 8, on one H100: more than the GPU holds (the planner's refusal),
# with a data path that need not exist (tests that validate write it first).
BIG = """\
name: big
method: lora
model:
  random_init: {preset: llama-3-8b}
data: {train: x.jsonl, seq_len: 8192}
training:
  micro_batch_size: 8
resources:
  gpus_per_node: 1
  gpu_type: h100
output: {uri: file:///tmp/o}
"""
