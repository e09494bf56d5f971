"""Small job specs the tests share (tests/ is on sys.path: `from specs import TINY_LORA`)."""

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
