"""`python -m minituner.compare`: instruction tuning and fine-tuning side by side on the built-in
experiment. The comparison lives in minituner/experiment/compare.py."""

import sys

from minituner.experiment.compare import main

if __name__ == "__main__":
    sys.exit(main())
