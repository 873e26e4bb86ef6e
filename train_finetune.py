"""Fine-tuning: further training of a model's weights on domain or task text, every token a
target, so that it specialises; or pretraining a small model from scratch.

    python train_finetune.py                  # the built-in experiment: no download
    python train_finetune.py --base MODEL_DIR --data corpus.txt --val-fraction 0.1 --eval-every 50 --patience 3
    python train_finetune.py --base MODEL_DIR --data docs/ --general-eval general.txt    # forgetting in view
    python train_finetune.py --init scratch --preset small --vocab-size 4096 --data corpus.txt --steps 2000
    python train_finetune.py --resume runs/train_finetune-...   # continue an interrupted run

`python train_finetune.py --help` lists every flag. The recipe, readable top to bottom, is
minituner/recipes/finetune.py (also `python -m minituner.recipes.finetune`).
"""

import sys

from minituner.recipes.finetune import main

if __name__ == "__main__":
    sys.exit(main())
