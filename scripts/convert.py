"""Convert between Hugging Face BERT / GPT-2 folders and the course Transformer (see
course_transformer/core/conversion.py).

python scripts/convert.py --from-bert PATH --output DIR
python scripts/convert.py --to-gpt2 PATH --output DIR
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Runnable from a checkout whose editable install predates a new package.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from course_transformer.core.conversion import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
