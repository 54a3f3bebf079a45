"""Run a script under accelerate's FSDP2 or DeepSpeed on CPU processes (gloo): the tests' way to train sharded without a GPU.

    python -m accelerate.commands.launch --config_file configs/accelerate/fsdp2.yaml --num_processes 2 \\
        --mixed_precision no tests/sharded_on_cpu.py train.py ARGS...

accelerate (1.15) selects FSDP and DeepSpeed only for GPU-like device types: on a CPU-only machine
an FSDP launch becomes plain gloo data parallelism (train.py refuses it: it would not be sharded)
and a DeepSpeed launch runs every process alone. This launcher lifts that one gate before the
script starts: it brings up accelerate's CPU process group (gloo), then lets accelerate's state
take its GPU-family path, where it selects FSDP or DeepSpeed from the launch's config. All the
rest, `fully_shard` or DeepSpeed's engine (its CPU accelerator), the sharded checkpoints and the
full-state-dict gather, is accelerate's, torch's and DeepSpeed's own code, on CPU tensors.
"""

import os
import runpy
import sys

from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DeepSpeedPlugin, DistributedType, TorchDynamoPlugin

state = PartialState(cpu=True)  # gloo process group over the launched processes
if state.distributed_type != DistributedType.MULTI_CPU:
    raise SystemExit(f"expected accelerate to start CPU data parallelism, got {state.distributed_type}")
state.distributed_type = DistributedType.MULTI_GPU  # the gate: AcceleratorState picks FSDP/DeepSpeed only here
if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
    # DeepSpeed is chosen only when the state is not built for the CPU; build it here, as accelerate would on GPUs.
    AcceleratorState(cpu=False, deepspeed_plugin=DeepSpeedPlugin(), dynamo_plugin=TorchDynamoPlugin(),
                     _from_accelerator=True)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
