"""EvalConfig: BLiMP-style minimal pairs, scoring modes, temperatures, fine-tuning (recipe §6).

The typed config of every evaluation task lives here (common imports nothing of gptbert): a task
module of ``gptbert.evaluation`` names the section it reads (``Task.section``: "" for the shared
fields below, ``finetune`` for ``FinetuneConfig``) and the fields that hold its data
(``Task.locations``); the registry checks both against these dataclasses when it loads the task.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from .base import ConfigBase, check, check_device, check_location

ScoringMode = Literal["causal", "mntp", "fused"]
BabyLMTask = Literal["blimp", "supplement", "ewok", "entity_tracking", "wug_adj", "wug_past", "comps", "reading"]
BABYLM_TASKS = ("blimp", "supplement", "ewok", "entity_tracking", "wug_adj", "wug_past", "comps", "reading")
# The official BabyLM 2025 fine-tuning set (its eval_finetuning.sh), in the order it runs them.
BABYLM_FINETUNE_TASKS = ("boolq", "multirc", "rte", "wsc", "mrpc", "qqp", "mnli")


def temperature_sweep(start: float = 0.05, stop: float = 3.0, step: float = 0.05) -> list[float]:
    """The paper's sweep (0, 3] in steps of 0.05; T=0 itself is excluded (division by zero)."""
    n = int(round((stop - start) / step))
    return [round(start + i * step, 6) for i in range(n + 1)]


@dataclass
class FinetuneConfig(ConfigBase):
    """GLUE-style sentence(-pair) classification (recipe §6: the paper's settings are the defaults)."""

    # Folder with `<task>.train.jsonl` and `<task>.valid.jsonl` (the official glue_filtered/ layout
    # for the tasks the BabyLM pipeline knows, else sentence1, [sentence2,] label).
    data_dir: str = ""
    tasks: list[str] = field(default_factory=list)
    # "paper": every task trains with the fields below. "babylm": the official BabyLM 2025
    # pipeline's per-task hyperparameters (lr 3e-5, batch 32 or 16, 10 or 30 epochs, length 512,
    # seed 42, its schedule); lr, batch_size, epochs, warmup_ratio, weight_decay, max_length and
    # seed are then not used (results.json records what each task trained with).
    recipe: Literal["paper", "babylm"] = "paper"
    # A task whose files are absent is skipped with a note instead of failing (--suite babylm).
    skip_missing: bool = False
    lr: float = 1e-4
    batch_size: int = 16
    # Paper: 3 epochs for large tasks (MNLI, QQP, SST-2, QNLI), 10 for small ones (CoLA, RTE, MRPC).
    epochs: int = 10
    warmup_ratio: float = 0.06
    weight_decay: float = 0.01
    max_length: int = 128
    # Classifier-head dropout is the model's hidden dropout; this caps examples for quick runs.
    max_train_examples: Optional[int] = None
    seed: int = 0

    def validate(self) -> None:
        """Reject invalid values with a ConfigError naming the field."""
        check(self.lr > 0, "lr", "must be positive")
        check(self.batch_size > 0, "batch_size", "must be positive")
        check(self.epochs > 0, "epochs", "must be positive")
        check(0.0 <= self.warmup_ratio < 1.0, "warmup_ratio", "must be in [0, 1)")
        check(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        check(self.max_length >= 4, "max_length", "must be at least 4 tokens")
        check(self.max_train_examples is None or self.max_train_examples > 0, "max_train_examples",
              "must be positive or null (all)")
        check(not self.tasks or bool(self.data_dir), "data_dir", "must be set when tasks are given")
        check_location(self.data_dir, "data_dir")
        for i, task in enumerate(self.tasks):
            check(bool(task) and "/" not in task, f"tasks[{i}]", f"must be a task file prefix, got {task!r}")
            check(self.recipe != "babylm" or task in BABYLM_FINETUNE_TASKS, f"tasks[{i}]",
                  f"recipe babylm knows {', '.join(BABYLM_FINETUNE_TASKS)}; got {task!r}")


ICL_SHOTS = (0, 1, 2, 4, 8, 16)


@dataclass
class IclConfig(ConfigBase):
    """In-context learning (task ``icl``): k-shot classification of GLUE-format tasks, each label
    scored as a completion of a prompt of k training demonstrations and the validation item."""

    # Folder with `<task>.train.jsonl` (demonstrations) and `<task>.valid.jsonl` (test items), the
    # layout the `glue` task reads.
    data_dir: str = ""
    tasks: list[str] = field(default_factory=list)
    shots: list[int] = field(default_factory=lambda: list(ICL_SHOTS))
    # Prompt templates by index (gptbert.evaluation.icl.TEMPLATES) and demonstration seeds: every
    # (template, seed) is one run, and the results give their mean and spread.
    templates: list[int] = field(default_factory=lambda: [0, 1, 2])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    # Contextual calibration: also report the accuracy with each label's probability divided by
    # its probability for the content-free input below (same demonstrations).
    calibrate: bool = True
    content_free: str = "N/A"
    # Label words per task, "task=word0,word1,..." (label i -> word i); known GLUE tasks have defaults.
    verbalizers: list[str] = field(default_factory=list)
    # Cap on validation items per task, for quick runs; null = all.
    max_items: Optional[int] = None

    def validate(self) -> None:
        """Reject invalid values with a ConfigError naming the field."""
        check(not self.tasks or bool(self.data_dir), "data_dir", "must be set when tasks are given")
        check_location(self.data_dir, "data_dir")
        for i, task in enumerate(self.tasks):
            check(bool(task) and "/" not in task, f"tasks[{i}]", f"must be a task file prefix, got {task!r}")
        check(len(self.shots) > 0 and all(isinstance(k, int) and k >= 0 for k in self.shots), "shots",
              f"must be numbers of demonstrations >= 0, got {self.shots}")
        check(len(set(self.shots)) == len(self.shots), "shots", f"has duplicates: {self.shots}")
        check(len(self.templates) > 0 and len(set(self.templates)) == len(self.templates)
              and all(0 <= t < 3 for t in self.templates), "templates",
              f"must be distinct template indices 0..2, got {self.templates}")
        check(len(self.seeds) > 0 and len(set(self.seeds)) == len(self.seeds), "seeds",
              f"must be distinct seeds, at least one, got {self.seeds}")
        check(bool(self.content_free.strip()), "content_free", "must be a non-empty text")
        for i, v in enumerate(self.verbalizers):
            task, _, words = v.partition("=")
            check(bool(task) and len([w for w in words.split(",") if w.strip()]) >= 2, f"verbalizers[{i}]",
                  f"must be task=word0,word1[,...] (one word per label), got {v!r}")
        check(self.max_items is None or self.max_items > 0, "max_items", "must be positive or null (all)")


@dataclass
class EvalConfig(ConfigBase):
    """Configures the evaluate stage (recipe §6): tasks, BLiMP data, scoring modes, temperatures, batch
    size and fine-tuning."""

    # Evaluation tasks (the modules of gptbert.evaluation that declare a TASK) to run, in order; a
    # task whose data is not configured is skipped with a note in the results.
    tasks: list[str] = field(default_factory=lambda: ["blimp", "babylm", "glue"])
    # Where every stage that runs a model for evaluation computes (scoring, the BabyLM suite,
    # reading, fine-tuning, word milestones, `gptbert score`/`generate`/`evaluate`): auto (CUDA
    # when present) | cpu | cuda | cuda:N. CUDA asked for where there is none is an error before
    # any work. It changes where, not what: not part of the evaluation's identity.
    device: str = "auto"
    # Folder of BLiMP-format jsonl files (one paradigm per file): the `blimp` task's data.
    blimp_dir: str = ""
    modes: list[ScoringMode] = field(default_factory=lambda: ["causal", "mntp", "fused"])
    # Logits are divided by T before the log-softmax; every T is scored from one forward pass.
    temperatures: list[float] = field(default_factory=temperature_sweep)
    # Batch size in tokens (rows x padded length) for one forward pass while scoring: a number, or
    # auto: on CUDA the largest batch whose forward fits the device (a short probe per model and
    # row width, gptbert.device.fit_eval_max_tokens), on a CPU 8192. Scores do not depend on it.
    max_tokens: Union[int, Literal["auto"]] = "auto"
    # Precision of the zero-shot scoring forward passes: fp32 gives the official pipeline's numbers
    # (to ~1e-5 per sentence); bf16 autocast (or "auto": bf16 where the hardware runs it natively)
    # is about 1.9x faster on an AMX CPU and moves sentence scores by a few hundredths of a nat.
    precision: Literal["fp32", "bf16", "auto"] = "fp32"
    # Cap on pairs read from each paradigm, for quick runs; null = all.
    max_pairs_per_paradigm: Optional[int] = None
    # The BabyLM 2025 zero-shot suite (task `babylm`): a folder laid out like the official
    # pipeline's evaluation_data/ (full_eval/ and fast_eval/) or one of those two folders itself.
    babylm_dir: str = ""
    babylm_split: Literal["full", "fast"] = "full"
    babylm_tasks: list[BabyLMTask] = field(default_factory=lambda: list(BABYLM_TASKS))
    # The tuned temperature is chosen on every N-th item of each UID and reported on the others.
    tune_every: int = 5
    # Word-milestone models (train.word_milestones) beside the evaluated model are scored too, at
    # T = 1 with the zero-shot tasks only: the BabyLM suite's fast_eval when the folder has it, and
    # at most `milestone_max_items` items per paradigm/UID. "ray" runs them as parallel Ray tasks
    # (on launch.ray_address's cluster, or a local Ray; CPU tasks, so not with device cuda), "local"
    # one after another on `device`, "none" skips.
    milestones: Literal["none", "local", "ray"] = "local"
    milestone_max_items: Optional[int] = 200
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    icl: IclConfig = field(default_factory=IclConfig)

    RUNTIME_FIELDS = ("device",)

    def validate(self) -> None:
        """Reject invalid values with a ConfigError naming the field."""
        check(len(set(self.tasks)) == len(self.tasks), "tasks", f"has duplicates: {self.tasks}")
        check_device(self.device, "device")
        # Ray tasks of ray_map request CPUs only (Ray hides the GPUs from them).
        check(not (self.milestones == "ray" and self.device.startswith("cuda")), "milestones",
              f"ray scores the milestone models as CPU Ray tasks; with device {self.device} use local")
        for name in ("blimp_dir", "babylm_dir"):
            check_location(getattr(self, name), name)
        check(len(self.modes) > 0, "modes", "must name at least one of causal, mntp, fused")
        check(len(set(self.modes)) == len(self.modes), "modes", f"has duplicates: {self.modes}")
        check(len(self.temperatures) > 0, "temperatures", "must hold at least one temperature")
        for i, t in enumerate(self.temperatures):
            check(math.isfinite(t) and t > 0, f"temperatures[{i}]", f"must be a positive number, got {t}")
        check(len(set(self.temperatures)) == len(self.temperatures), "temperatures", "has duplicates")
        check(self.max_tokens == "auto" or (isinstance(self.max_tokens, int) and not isinstance(self.max_tokens, bool)
                                            and self.max_tokens >= 16),
              "max_tokens", f"must be auto or a number of tokens of at least 16, got {self.max_tokens!r}")
        check(self.max_pairs_per_paradigm is None or self.max_pairs_per_paradigm > 0,
              "max_pairs_per_paradigm", "must be positive or null (all pairs)")
        check(len(set(self.babylm_tasks)) == len(self.babylm_tasks), "babylm_tasks", f"has duplicates: {self.babylm_tasks}")
        check(self.milestone_max_items is None or self.milestone_max_items > 0, "milestone_max_items",
              "must be positive or null (all)")
        check(self.tune_every >= 2, "tune_every", "must be at least 2 (one dev item in N)")
