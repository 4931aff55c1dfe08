"""Multi-exit networks: net (MultiExitNet, heads), costs (the one MAC counter), surgery (exits on torchvision
classifiers), zoo (factories and ModelConfig)."""
from .costs import count_macs, measure_costs
from .net import HEADS, MultiExitNet, add_confidence_branches, make_head
from .surgery import SCHEDULES, attach_exits, default_cuts, list_cut_points, place_exits, schedule_fractions
from .zoo import (FACTORIES, TORCHVISION_BACKBONES, ModelConfig, bare_torchvision, build_model, count_parameters,
                  plan_exits, torchvision_backbone)

__all__ = ["FACTORIES", "HEADS", "SCHEDULES", "TORCHVISION_BACKBONES", "ModelConfig", "MultiExitNet",
           "add_confidence_branches", "attach_exits", "bare_torchvision", "build_model", "count_macs",
           "count_parameters", "default_cuts", "list_cut_points", "make_head", "measure_costs", "place_exits",
           "plan_exits", "schedule_fractions", "torchvision_backbone"]
