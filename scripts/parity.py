"""Parity of the course Transformer with BERT / GPT-2, per layer and head (see evaluation/parity.py).

python scripts/parity.py --reference bert-minilm --output outputs/parity/bert-minilm
python scripts/parity.py --reference gpt2 --output outputs/parity/gpt2 --dtype bfloat16
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Runnable from a checkout whose editable install predates the `evaluation` package.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from evaluation.parity import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
