"""The two training scripts' bodies, each readable top to bottom: instruction tuning (instruct.py)
and fine-tuning or pretraining from scratch (finetune.py); the flags and checks they share
(flags.py), what they print at the end (report.py) and the folders they export (export.py)."""
