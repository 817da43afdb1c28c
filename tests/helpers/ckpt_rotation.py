"""Worker for tests/test_patch_ckpt.py: OpenRLHF's DeepspeedStrategy.save_ckpt with a real DeepSpeed engine on
CPU (gloo, one rank), a save interrupted half-way, then OpenRLHF's load_ckpt.

Usage: python ckpt_rotation.py MODE SAVE_DIR PORT. MODE: stock (OpenRLHF 0.11.2 + this package's compat layer),
ours (the same + write_then_retire on the strategy), patched (an OpenRLHF with patches/ applied first on
PYTHONPATH, no compat layer, no wrapper).
Prints one JSON line: {"dirs_before", "dirs_after_crash", "loaded", "dirs_after_rotation"}.
"""

import json
import os
import sys

mode, save_dir, port = sys.argv[1], sys.argv[2], sys.argv[3]
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

dist.init_process_group("gloo", rank=0, world_size=1)

if mode != "patched":
    from openrlhf_irl import compat

    compat.activate()

import deepspeed  # noqa: E402
from openrlhf.utils.deepspeed.deepspeed import DeepspeedStrategy  # noqa: E402

torch.manual_seed(0)
net = torch.nn.Linear(8, 8)
config = {"train_micro_batch_size_per_gpu": 1, "train_batch_size": 1, "zero_optimization": {"stage": 0},
          "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}}}
engine, *_ = deepspeed.initialize(model=net, model_parameters=net.parameters(), config=config)

strategy = DeepspeedStrategy.__new__(DeepspeedStrategy)  # save_ckpt/load_ckpt use no constructor state
if mode == "ours":
    from openrlhf_irl.utils.checkpoint import write_then_retire

    write_then_retire(strategy)


def step():
    loss = engine(torch.randn(1, 8)).pow(2).sum()
    engine.backward(loss)
    engine.step()


def listing():
    return sorted(d for d in os.listdir(save_dir) if os.path.isdir(os.path.join(save_dir, d)))


step()
strategy.save_ckpt(engine, save_dir, "global_step1", max_num=1, max_mem=1000)
saved_weight = net.weight.detach().clone()
step()
strategy.save_ckpt(engine, save_dir, "global_step2", max_num=1, max_mem=1000)
saved_weight = net.weight.detach().clone()
dirs_before = listing()

# a kill during the next save, at its first write
step()
real_save = torch.save
calls = {"n": 0}


def dying_save(obj, f, *args, **kwargs):
    calls["n"] += 1
    if calls["n"] == 1:
        raise KeyboardInterrupt("killed during the checkpoint save")
    return real_save(obj, f, *args, **kwargs)


torch.save = dying_save
try:
    strategy.save_ckpt(engine, save_dir, "global_step3", max_num=1, max_mem=1000)
except KeyboardInterrupt:
    pass
finally:
    torch.save = real_save
dirs_after_crash = listing()

with torch.no_grad():
    net.weight.zero_()
try:
    load_path, _ = strategy.load_ckpt(engine, save_dir)
    loaded = load_path is not None and torch.equal(net.weight, saved_weight)
except Exception as err:  # what a resume sees
    loaded = f"{type(err).__name__}: {err}"

# the next successful save retires both the finished and the partial older checkpoints
step()
strategy.save_ckpt(engine, save_dir, "global_step4", max_num=1, max_mem=1000)
print(json.dumps({"dirs_before": dirs_before, "dirs_after_crash": dirs_after_crash, "loaded": loaded,
                  "dirs_after_rotation": listing()}))
dist.destroy_process_group()
