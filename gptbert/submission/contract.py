"""The BabyLM leaderboard submission's contract: folders, expected counts, what each prediction records.

Read from the official code (github: babylm/evaluation-pipeline-2025, and babylm-org/babylm-eval
``strict/``, whose later ``collate_preds.py`` defines the 2026 submission); nothing of it is copied.
A submission is a results folder ``<results>/<model>/<revision>/`` per revision (``main`` for the
final model, ``chck_{N}M`` for each word milestone) holding one ``predictions.json`` per task, and
the collated ``<results>/<model>/all_full_preds_and_fast_scores_<backend>.json``.

A task's ``predictions.json`` is ``{key: {"predictions": [{"id": "<key>_<n>", "pred": ...}, ...]}}``
with one key per UID (BLiMP and its supplement: the UID; EWoK: the domain; entity tracking:
``<file>_<numops>_ops``; COMPS: base, wugs, ...; WUG: the task; GLUE: the task; reading: "reading";
Global PIQA: one key per ``example_id`` holding one prediction), items in file order. ``pred`` is
what the chosen candidate *is*: the completion string the official scorer compares (BLiMP: the
sentence; EWoK 2025: " " + target, 2026: context + " " + target; entity tracking: the option;
COMPS: the whole sentence; WUG: the sentence, with ``prob`` the softmax probability of the first;
Global PIQA: " " + solution), the class index (GLUE), or the surprisal and the previous word's
(reading: ``pred``, ``prev_pred``, NaN without a previous word).

2026 against 2025: Global PIQA added (103 and 100 items), WUG dropped, entity-tracking items
whose options contain "nothing" removed (new sizes; the collated key is ``entity_tracking_filtered``),
EWoK predictions are whole sentences, AoA under ``aoa_surprisals`` and ``aoa``, and a missing or
wrongly sized file becomes None (the 2025 code stops).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

LAYOUTS = ("2025", "2026")
TRACKS = ("strict-small", "strict")
BACKENDS = ("causal", "mntp")  # the official backends gptbert scores natively


def revisions(track: str) -> list[str]:
    """The word-milestone revisions a track's submission scores on fast_eval (1M..9M, 10M..100M;
    the strict track also 200M..1000M)."""
    out = [f"chck_{i}M" for i in range(1, 10)] + [f"chck_{i * 10}M" for i in range(1, 10 if track != "strict-small" else 11)]
    return out + ([f"chck_{i * 100}M" for i in range(1, 11)] if track != "strict-small" else [])


BLIMP = dict((k, int(v)) for k, v in (p.split(":") for p in """
    superlative_quantifiers_2:986 superlative_quantifiers_1:979 anaphor_gender_agreement:971
    principle_a_reconstruction:967 irregular_past_participle_adjectives:961
    sentential_subject_island:961 wh_island:960 left_branch_island_simple_question:951
    coordinate_structure_constraint_object_extraction:949 tough_vs_raising_1:948
    left_branch_island_echo_question:947 principle_a_c_command:946
    regular_plural_subject_verb_agreement_2:945 irregular_past_participle_verbs:942
    determiner_noun_agreement_with_adj_2:941 principle_a_domain_3:941
    determiner_noun_agreement_with_adjective_1:933 anaphor_number_agreement:931
    determiner_noun_agreement_2:931 existential_there_quantifiers_1:930
    determiner_noun_agreement_1:929 matrix_question_npi_licensor_present:929 adjunct_island:928
    existential_there_subject_raising:924 animate_subject_trans:923 drop_argument:920
    tough_vs_raising_2:920 wh_vs_that_with_gap:919 sentential_negation_npi_licensor_present:919
    principle_a_case_2:915 principle_a_domain_2:915 principle_a_domain_1:914 npi_present_2:914
    principle_a_case_1:912 existential_there_quantifiers_2:911 wh_vs_that_with_gap_long_distance:910
    npi_present_1:909 coordinate_structure_constraint_complex_left_branch:906 passive_2:903
    wh_questions_subject_gap:898 animate_subject_passive:895
    irregular_plural_subject_verb_agreement_2:892 regular_plural_subject_verb_agreement_1:890
    only_npi_licensor_present:882 wh_vs_that_no_gap_long_distance:875
    distractor_agreement_relative_clause:871 sentential_negation_npi_scope:871 intransitive:868
    transitive:868 wh_vs_that_no_gap:861 wh_questions_object_gap:859
    wh_questions_subject_gap_long_distance:857 inchoative:855 complex_np_island:846 passive_1:840
    determiner_noun_agreement_with_adj_irregular_2:840 only_npi_scope:837 ellipsis_n_bar_2:828
    determiner_noun_agreement_irregular_2:820 causative:818 existential_there_object_raising:812
    irregular_plural_subject_verb_agreement_1:804 ellipsis_n_bar_1:802
    distractor_agreement_relational_noun:788 expletive_it_object_raising:759
    determiner_noun_agreement_with_adj_irregular_1:718 determiner_noun_agreement_irregular_1:681
""".split()))
SUPPLEMENT = {"hypernym": 842, "qa_congruence_easy": 64, "qa_congruence_tricky": 165, "subject_aux_inversion": 3867,
              "turn_taking": 280}
EWOK = {"agent-properties": 2210, "social-relations": 1548, "physical-relations": 818, "material-dynamics": 770,
        "physical-interactions": 556, "spatial-relations": 490, "social-properties": 328,
        "quantitative-properties": 314, "social-interactions": 294, "material-properties": 170,
        "physical-dynamics": 120}
_SPLITS = ("regular", "ambiref", "move_contents")
ENTITY_2025 = dict(zip((f"{s}_{n}_ops" for s in _SPLITS for n in range(6)), (
    606, 607, 606, 606, 568, 159, 607, 607, 604, 604, 615, 187, 605, 606, 605, 606, 529, 156)))
ENTITY_2026 = dict(zip((f"{s}_{n}_ops" for s in _SPLITS for n in range(6)), (
    517, 409, 405, 425, 388, 94, 508, 428, 413, 409, 434, 123, 516, 437, 399, 406, 353, 116)))
COMPS = {"base": 49340, "wugs_dist_before": 13896, "wugs_dist_in_between": 13896, "wugs": 13896}
GLUE = {"boolq": 1635, "mnli": 4908, "mrpc": 204, "multirc": 2424, "qqp": 20215, "rte": 139, "wsc": 52}
GLOBAL_PIQA = {"global_piqa_parallel": 103, "global_piqa_nonparallel": 100}
READING = 1726
AOA_WORDS = 8005  # AoA surprisal rows per revision


@dataclass(frozen=True)
class Part:
    """One predictions file of a revision: the task as the suite names it (``babylm`` subtask,
    ``reading``, ``global_piqa`` set, ``glue:<task>``, ``aoa``), its path under the revision folder,
    its key in the collated file, the data folder (or file) it reads under ``full_eval``/``fast_eval``,
    and the counts it must have: {key: n} (a key missing from the data is allowed, as the official
    check only counts the keys present), one count for every key (``each``), or a number of keys
    (``keys``, Global PIQA: one prediction each)."""

    task: str
    path: str
    collated: str
    data: str
    sizes: Optional[dict] = None
    each: Optional[int] = None
    keys: Optional[int] = None


def full_parts(layout: str, backend: str) -> list[Part]:
    """The final model's files, in the order the official collation writes them."""
    z = f"zero_shot/{backend}"
    et = Part("entity_tracking", f"{z}/entity_tracking/entity_tracking/predictions.json",
              "entity_tracking" if layout == "2025" else "entity_tracking_filtered", "entity_tracking",
              ENTITY_2025 if layout == "2025" else ENTITY_2026)
    parts = [Part("blimp", f"{z}/blimp/blimp_filtered/predictions.json", "blimp", "blimp_filtered", BLIMP),
             Part("supplement", f"{z}/blimp/supplement_filtered/predictions.json", "blimp_supplement",
                  "supplement_filtered", SUPPLEMENT),
             Part("ewok", f"{z}/ewok/ewok_filtered/predictions.json", "ewok", "ewok_filtered", EWOK), et]
    if layout == "2025":
        parts += [Part("wug_adj", f"{z}/wug_adj/wug_adj_nominalization/predictions.json", "wug_adj",
                       "wug_adj_nominalization", each=200),
                  Part("wug_past", f"{z}/wug_past/wug_past_tense/predictions.json", "wug_past", "wug_past_tense",
                       each=50)]
    parts.append(Part("comps", f"{z}/comps/comps/predictions.json", "comps", "comps", COMPS))
    if layout == "2026":
        parts += [Part(name, f"{z}/{name}/{name}/predictions.json", name, name, keys=n) for name, n in GLOBAL_PIQA.items()]
    parts += [Part("reading", f"{z}/reading/predictions.json", "reading", "reading/reading_data.csv", each=READING),
              Part("aoa", f"{z}/AoA_word/surprisal.json", "aoa" if layout == "2025" else "aoa_surprisals", "aoa",
                   each=AOA_WORDS)]
    if layout == "2026":
        parts.append(Part("aoa_score", f"{z}/AoA_word/aoa_score.json", "aoa", "aoa"))
    parts += [Part(f"glue:{t}", f"finetune/{t}/predictions.json", "glue", "glue_filtered", {t: n})
              for t, n in GLUE.items()]
    return parts


def fast_parts(layout: str, backend: str) -> list[Part]:
    """A milestone revision's files (fast_eval), in the order of the collated fast scores."""
    z = f"zero_shot/{backend}"
    parts = [Part("blimp", f"{z}/blimp/blimp_fast/predictions.json", "blimp", "blimp_fast", each=200),
             Part("supplement", f"{z}/blimp/supplement_fast/predictions.json", "blimp_supplement",
                  "supplement_fast", each=50),
             Part("ewok", f"{z}/ewok/ewok_fast/predictions.json", "ewok", "ewok_fast", each=100),
             Part("entity_tracking", f"{z}/entity_tracking/entity_tracking_fast/predictions.json",
                  "entity_tracking" if layout == "2025" else "entity_tracking_filtered", "entity_tracking_fast",
                  {k: v for k, v in (ENTITY_2025 if layout == "2025" else ENTITY_2026).items() if k.startswith("regular")})]
    if layout == "2025":
        parts += [Part("wug_adj", f"{z}/wug_adj/wug_adj_nominalization/predictions.json", "wug_adj",
                       "wug_adj_nominalization", each=200),
                  Part("wug_past", f"{z}/wug_past/wug_past_tense/predictions.json", "wug_past", "wug_past_tense",
                       each=50)]
    else:
        parts += [Part(name, f"{z}/{name}/{name}/predictions.json", name, name, keys=n) for name, n in GLOBAL_PIQA.items()]
    return parts + [Part("reading", f"{z}/reading/predictions.json", "reading", "reading/reading_data.csv",
                         each=READING)]


def size_problem(part: Part, counts: dict[str, int]) -> Optional[str]:
    """Why ``counts`` ({key: predictions}) is not what the official check accepts, or None."""
    if part.keys is not None:
        if len(counts) != part.keys:
            return f"{len(counts)} items, the official submission expects {part.keys}"
        bad = next((k for k, n in counts.items() if n != 1), None)
        return None if bad is None else f"example {bad} has {counts[bad]} predictions, expected 1"
    for key, n in counts.items():
        expected = part.each if part.each is not None else (part.sizes or {}).get(key.lower())
        if expected is None:
            return f"{key}: not a subset the official submission knows (known: {', '.join(sorted(part.sizes or {}))})"
        if n != expected:
            return f"{key} has {n} items, the official submission expects {expected}"
    return None


__all__ = ["AOA_WORDS", "BACKENDS", "BLIMP", "COMPS", "ENTITY_2025", "ENTITY_2026", "EWOK", "GLOBAL_PIQA", "GLUE",
           "LAYOUTS", "Part", "READING", "SUPPLEMENT", "TRACKS", "fast_parts", "full_parts", "revisions", "size_problem"]


@dataclass(frozen=True)
class Contract:
    """Everything one submission is checked against: the layout, track and backend, the final
    model's parts, a milestone's parts and the milestone revisions (``official`` builds the
    challenge's; a test may set the counts of smaller data)."""

    layout: str
    track: str
    backend: str
    full: tuple[Part, ...]
    fast: tuple[Part, ...]
    revisions: tuple[str, ...]

    @property
    def output_name(self) -> str:
        """The collated file's name."""
        return f"all_full_preds_and_fast_scores_{self.backend}.json"


def official(layout: str, track: str, backend: str) -> Contract:
    """The challenge's contract for ``layout`` (2025 or 2026), ``track`` and ``backend``."""
    for value, allowed, what in ((layout, LAYOUTS, "layout"), (track, TRACKS, "track"), (backend, BACKENDS, "backend")):
        if value not in allowed:
            raise ValueError(f"submission {what} {value!r}: expected one of {', '.join(allowed)}")
    return Contract(layout, track, backend, tuple(full_parts(layout, backend)), tuple(fast_parts(layout, backend)),
                    tuple(revisions(track)))


__all__ += ["Contract", "official"]
