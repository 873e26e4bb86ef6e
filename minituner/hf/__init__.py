"""Hugging Face and PEFT files: config.json (config.py), weight names and GPT-2's layout (layout.py),
model folders and shards (folder.py), tokenizer files (tokenizer.py), adapter folders (peft.py)."""
