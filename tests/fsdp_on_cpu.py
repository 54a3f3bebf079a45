"""Run a script under accelerate's FSDP2 on CPU processes (gloo): the tests' way to train sharded without a GPU.

    python -m accelerate.commands.launch --config_file configs/accelerate/fsdp2.yaml --num_processes 2 \\
        --mixed_precision no tests/fsdp_on_cpu.py train.py ARGS...

accelerate (1.15) selects FSDP only for GPU-like device types: on a CPU-only machine an FSDP launch
becomes plain gloo data parallelism, which train.py refuses (it would not be sharded). This
launcher lifts that one gate before the script starts: it brings up accelerate's CPU process
group (gloo), then lets accelerate's state take its GPU-family path, where it selects FSDP. All
the rest, `fully_shard`, torch.distributed.checkpoint shards, the full-state-dict gather, is
accelerate's and torch's own code, on CPU tensors.
"""

import runpy
import sys

from accelerate.state import PartialState
from accelerate.utils import DistributedType

state = PartialState(cpu=True)  # gloo process group over the launched processes
if state.distributed_type != DistributedType.MULTI_CPU:
    raise SystemExit(f"expected accelerate to start CPU data parallelism, got {state.distributed_type}")
state.distributed_type = DistributedType.MULTI_GPU  # the gate: AcceleratorState picks FSDP only for GPU types
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
