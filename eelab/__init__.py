"""eelab: a workbench for early-exit neural networks. Run the network once, decide many times."""
from .__version__ import __version__
from .checkpoint import load_checkpoint, read_history
from .data import load_dataset, split_train_cal
from .ensemble import ExitEnsemble, fit_ensemble, load_ensemble
from .errors import EelabError
from .inference import EarlyExitPredictor, benchmark_inference, profile_checkpoint
from .metrics import area_under_frontier, bootstrap_ci, evaluate, oracle_frontier, pareto_front
from .models import FACTORIES, ModelConfig, MultiExitNet, build_model, measure_costs
from .policies import POLICIES, load_policy, make_policy
from .records import ExitRecord, collect, load_record, load_records, record_checkpoint
from .sweep import precompute_grid, sweep
from .training import TrainConfig, train

__all__ = [
    "__version__", "EarlyExitPredictor", "EelabError", "ExitEnsemble", "ExitRecord", "FACTORIES", "ModelConfig",
    "MultiExitNet", "fit_ensemble", "load_ensemble",
    "POLICIES", "TrainConfig", "area_under_frontier", "benchmark_inference", "bootstrap_ci", "build_model",
    "collect", "evaluate", "load_checkpoint", "load_dataset", "load_policy", "load_record", "load_records",
    "make_policy", "measure_costs", "oracle_frontier", "pareto_front", "precompute_grid", "profile_checkpoint",
    "read_history", "record_checkpoint", "split_train_cal", "sweep", "train",
]
