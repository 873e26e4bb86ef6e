"""`python -m minituner.synth`: write one of the built-in experiment's synthetic sets to a file.
The generators live in minituner/experiment/synth.py and domain.py."""

import sys

from minituner.experiment.builtin import synth_main as main

if __name__ == "__main__":
    sys.exit(main())
