"""``blora-export train``: fine-tune a Q-BLoRA or QA-BLoRA adapter and write a native checkpoint.

``train(TrainConfig(...))`` is the one entry point (the CLI command is a thin wrapper). The
checkpoint it writes is read by every exporter and passes ``verify``; see :mod:`.loop`.
"""
from .config import TARGET_HELP, AdapterSpec, Target, TrainConfig, parse_target, resolve_spec
from .loop import TrainResult, train

__all__ = ["TARGET_HELP", "AdapterSpec", "Target", "TrainConfig", "TrainResult", "parse_target", "resolve_spec",
           "train"]
