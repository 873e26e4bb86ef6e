"""Instruction tuning: supervised training on instruction -> response pairs, with the loss on
the response tokens only, so that a pretrained model learns to follow instructions.

    python train_instruct.py                  # the built-in experiment: no download
    python train_instruct.py --base MODEL_DIR --data data.jsonl [--template chatml] [--method lora|full]
    torchrun --nproc_per_node 2 train_instruct.py --base MODEL_DIR --data data.jsonl ...
    python train_instruct.py --resume runs/train_instruct-...   # continue an interrupted run

`python train_instruct.py --help` lists every flag. The recipe, readable top to bottom, is
minituner/recipes/instruct.py (also `python -m minituner.recipes.instruct`).
"""

import sys

from minituner.recipes.instruct import main

if __name__ == "__main__":
    sys.exit(main())
