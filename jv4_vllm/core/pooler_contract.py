"""What every vLLM deployment must do for the engine: the pooler contract, written once.

``token_embed`` returns one row per prompt token; ``use_activation: false`` keeps the raw
hidden states (vLLM L2-normalises token_embed rows by default, and the reference encoder
mean-pools raw rows). The deployments start with it (``--pooler-config``) and every
``/pooling`` call sends it again, so a server started without it still answers raw rows.
"""

from __future__ import annotations

from typing import Final

__all__ = ["POOLER_CONFIG", "POOLING_PATH"]

POOLER_CONFIG: Final[dict[str, object]] = {"task": "token_embed", "use_activation": False}
POOLING_PATH: Final = "/pooling"
