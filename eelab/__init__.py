"""eelab: a workbench for early-exit neural networks. Run the network once, decide many times."""
from .__version__ import __version__
from .data import load_dataset, split_train_cal
from .errors import EelabError
from .models import FACTORIES, ModelConfig, MultiExitNet, build_model, measure_costs
from .records import ExitRecord, collect, load_record, record_checkpoint
from .training import TrainConfig, load_checkpoint, read_history, train

__all__ = [
    "__version__", "EelabError", "ExitRecord", "FACTORIES", "ModelConfig", "MultiExitNet", "TrainConfig",
    "build_model", "collect", "load_checkpoint", "load_dataset", "load_record", "measure_costs",
    "read_history", "record_checkpoint", "split_train_cal", "train",
]
