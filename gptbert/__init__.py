"""The plain-PyTorch core of GPT-BERT: the model, the hybrid objective, the optimiser, the training
loop, checkpoints, sentence scoring, generation and the evaluation tasks.

Distribution is applied outside the core, in ``gptbert.distributed`` (launchers: the only place Ray
and DeepSpeed are imported); the loop itself only sees a step backend.
"""

import os as _os

# oneDNN, which runs torch's bf16 matmuls on CPU, keeps every matmul shape's compiled kernels in two
# least-recently-used caches of 1,024 entries each (oneDNN's primitive cache and ideep's descriptor
# cache), about 1.1 MB a shape with AMX kernels. Training shapes change from step to step (the batch
# ramp, the LM head's target count, the last micro-batch), so the caches grew to ~1 GB in a tiny
# run and ~2 GB in a cpu-small one, never given back (docs/recipes.md, "Memory"). A tiny step
# executes about 40 distinct matmuls (counted with ONEDNN_VERBOSE: a cache of 32 missed again and
# again, one of 64 no more than 1,024), so 128 keeps every repeated shape a hit. The user's own
# setting wins; the libraries read it at their first matmul, not at import.
CPU_KERNEL_CACHE_ENV = {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "128", "LRU_CACHE_CAPACITY": "128"}
for _name, _value in CPU_KERNEL_CACHE_ENV.items():
    _os.environ.setdefault(_name, _value)
