"""``python -m pos_swap ...`` is ``pos-swap ...``; ``accelerate launch -m pos_swap finetune ...`` runs it on
several processes or GPUs."""

import sys

from .cli import main

sys.exit(main())
