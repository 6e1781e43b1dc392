"""Training AEGAN, as a library (``python -m aegan_fast.train`` is its command line).

    stages.py     what each stage trains and its step function (stages as data), run_stage, take_step
    run_state.py  making a run's state, and the one place that writes and reads a checkpoint's schema
    run_log.py    metrics.jsonl, preview grids, stage-end evaluation, which checkpoint to sample from
    loop.py       train(): the stages in order, with signals, rollbacks and checkpoints between steps
    validate.py   the rules a config must meet before anything is made
"""
from .loop import train
from .run_state import load_sampling_nets, new_state, restore, save_run
from .stages import AEGAN_STAGES, STAGES, Stage, TrainState, enter_stage, run_stage, take_step
from .validate import check_world, validate

__all__ = ["train", "new_state", "restore", "save_run", "load_sampling_nets", "AEGAN_STAGES", "STAGES", "Stage",
           "TrainState", "enter_stage", "run_stage", "take_step", "check_world", "validate"]
