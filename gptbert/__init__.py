"""The plain-PyTorch core of GPT-BERT: the model, the hybrid objective, the optimiser, the training
loop, checkpoints, sentence scoring, generation and the evaluation tasks.

Distribution is applied outside the core, in ``gptbert.distributed`` (launchers: the only place Ray
and DeepSpeed are imported); the loop itself only sees a step backend.
"""
