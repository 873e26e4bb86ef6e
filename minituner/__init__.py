"""minituner: instruction tuning and fine-tuning of pretrained language models, every mechanic
written out in plain PyTorch.

Modules (each owns one concept):
  config      the model's shape, and conversion from/to Hugging Face config.json
  model       the decoder-only transformer and its KV cache
  tokenizer   tokenizer.json wrapper, special tokens, BPE training for new models
  checkpoint  Hugging Face model folders: load_pretrained / save_pretrained
  generate    greedy and sampled decoding with a KV cache, and a small CLI
  loss        IGNORE_INDEX and the masked next-token loss, as a sum over target tokens
  precision   fp32 master weights, bf16/fp16 compute, dynamic loss scaling
  optim       AdamW parameter groups, learning-rate schedule, gradient clipping
  distributed devices, torchrun process groups, collectives
  trainer     the training loop shared by both scripts
  state       the run folder: checkpoints, exact resume, metrics
  bench       throughput and memory benchmarks
  errors      UserError, the exception for mistakes in a user's input
"""

__version__ = "0.1.0"
