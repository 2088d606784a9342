"""blora-export: turn Q-BLoRA / QA-BLoRA checkpoints into models edge runtimes run, and prove it."""
from .api import export, inspect, open_job, verify
from .checkpoint import Checkpoint, load_checkpoint
from .delta import AdapterModule, adapter_forward, delta_weight, lora_factors
from .errors import BadInputError, BloraError, UnsupportedError, VerificationError
from .quant import QuantizedWeight, fold_into_zero_points, quantize_minmax
from .spec import BloraConfig, MinMaxGrid, NF4Base

__version__ = "0.1.0"
__all__ = ["export", "inspect", "open_job", "verify", "Checkpoint", "load_checkpoint", "AdapterModule",
           "adapter_forward", "delta_weight", "lora_factors", "BadInputError", "BloraError",
           "UnsupportedError", "VerificationError", "QuantizedWeight", "fold_into_zero_points",
           "quantize_minmax", "BloraConfig", "MinMaxGrid", "NF4Base"]
