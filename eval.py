"""Evaluate a trained DAD run and write ``report.json`` and ``report.md`` into its directory.

    python eval.py --run runs/demo
    python eval.py --run runs/demo --eval.max_test 200
    python eval.py --run runs/digits_ssni --eval.defense defense_ssni_n.pt   # a diffusion purifier's defense
"""

from __future__ import annotations

import sys

from evaluation.cli import main_eval

if __name__ == "__main__":
    sys.exit(main_eval(sys.argv[1:]))
