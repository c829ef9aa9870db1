"""Should the number of inner updates be chosen on meta-validation, as Finetune's steps are? (loop-length study)

Finetune picks its (lr, steps) on the meta-validation scenarios; s²Meta's loop length comes from
its stop controller, which learned it from meta-train scenarios. This re-evaluates a finished run
folder's learner (``best.pt``) on meta-validation under each candidate rule: the stop as trained
(``sample``: the run's own rule, ``eval_stop`` if it set one) and t fixed updates of the learned
update controller (no stop), t in ``FIXED``. It trains nothing and never changes the folder.
Reported per run folder:

* ``valid``   pooled meta-validation Recall@20 of every candidate (``sample`` is the run's best
              validation score: ``best.pt`` was chosen on it);
* ``choice``  the candidate with the best validation score (ties go to ``sample``);
* ``loo``     leave-one-scenario-out: for each validation scenario, the choice made on the others,
              scored on it, pooled over the scenarios, minus ``sample`` pooled the same way. It is
              a validation-only estimate of what choosing gains, biased against choosing: ``best.pt``
              was picked by ``sample``'s score on every validation scenario, the held-out one too;
* ``test``    with ``--test`` only, a diagnostic that enters no choice: meta-test Recall@20 of the
              choice minus that of ``sample`` (which is the run's s²Meta result).

Usage (one intra-op thread; a few seconds per run folder: one loop per block serves every t):

    OMP_NUM_THREADS=1 python benchmarks/studies/loop_length.py runs/planted05-0 runs/planted05-1 ... [--test]
"""
from __future__ import annotations

import argparse
import sys
from typing import Any, Dict, List, Sequence

import numpy as np

from run_folders import fixed_step_results, load_run
from s2meta_fast.app import eval_tasks
from s2meta_fast.eval.baselines import S2Meta
from s2meta_fast.eval.protocol import evaluate

FIXED = (4, 5, 6, 8, 10, 12, 15, 20)
SAMPLE = "sample"
METRIC = "recall@20"


def scores(out_dir: str, splits: Sequence[str]) -> Dict[str, Any]:
    """``{split: {candidate: {scenario: (rows, metric sum)}}}`` for the run folder's learner."""
    cfg, prepared, learner = load_run(out_dir, "loop_length")
    candidates: List[Any] = [SAMPLE] + [t for t in FIXED if t <= learner.config.t_max]
    out: Dict[str, Any] = {}
    for split in splits:
        tasks = eval_tasks(prepared, split, cfg.run.seed)
        if not tasks:
            raise SystemExit(f"loop_length: the run in {out_dir} has no {split} scenario to score")
        results = fixed_step_results(cfg, learner, tasks, candidates[1:])   # one loop per block for every t
        results[SAMPLE] = evaluate(S2Meta(learner, stop=cfg.stop_at_evaluation, cuda_graphs=False), tasks, (20,),
                                   seed=cfg.run.seed, block_size=cfg.eval.block_size, max_pairs=cfg.eval.max_pairs,
                                   progress=False)
        out[split] = {str(cand): {name: (v["count"], v["sums"][METRIC])
                                  for name, v in results[cand]["per_scenario"].items()} for cand in candidates}
    return out


def pooled(per: Dict[str, tuple], names: Sequence[str]) -> float:
    rows = sum(per[n][0] for n in names)
    return 100 * sum(per[n][1] for n in names) / rows if rows else float("nan")


def choose(split: Dict[str, Dict[str, tuple]], names: Sequence[str]) -> str:
    return max(split, key=lambda c: (round(pooled(split[c], names), 9), c == SAMPLE))


def study(out_dir: str, test: bool = False) -> Dict[str, Any]:
    s = scores(out_dir, ("valid", "test") if test else ("valid",))
    valid = s["valid"]
    names = list(valid[SAMPLE])
    rows = hits = 0.0
    for held in names:   # each scenario scored by the choice the others make
        pick = choose(valid, [n for n in names if n != held])
        rows += valid[pick][held][0]
        hits += valid[pick][held][1]
    result = {"run": out_dir, "valid": {c: pooled(valid[c], names) for c in valid}, "choice": choose(valid, names),
              "loo": 100 * hits / rows - pooled(valid[SAMPLE], names)}
    if test:
        tnames = list(s["test"][SAMPLE])
        result["test"] = pooled(s["test"][result["choice"]], tnames) - pooled(s["test"][SAMPLE], tnames)
    return result


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", help="run folders of `s2meta run`")
    parser.add_argument("--test", action="store_true", help="also the meta-test diagnostic (enters no choice)")
    args = parser.parse_args(argv)
    results = []
    for run in args.runs:
        r = study(run, test=args.test)
        results.append(r)
        print(f"{run}: valid " + " ".join(f"{c} {v:.2f}" for c, v in r["valid"].items())
              + f" | choice {r['choice']} | loo {r['loo']:+.2f}" + (f" | test {r['test']:+.2f}" if args.test else ""),
              flush=True)
    if len(results) > 1:
        loo = np.array([r["loo"] for r in results])
        line = (f"{len(results)} runs: choice != sample on {sum(r['choice'] != SAMPLE for r in results)}; "
                f"loo {loo.mean():+.2f} (better on {(loo > 0).sum()}, worse on {(loo < 0).sum()})")
        if args.test:
            t = np.array([r["test"] for r in results])
            line += (f"; test {t.mean():+.2f} ± {t.std(ddof=1) / np.sqrt(len(t)):.2f} s.e. "
                     f"(better on {(t > 0).sum()}, worse on {(t < 0).sum()})")
        print(line)


if __name__ == "__main__":
    sys.exit(main())
