"""Running a study: selections, then every cell, resumable by cell, task and selection step."""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import torch

from avss.adapters import get_adapter, remove_layers
from avss.errors import OutputError
from avss.evaluation import evaluate, get_task
from avss.evaluation.prefix import PrefixStore, choose_starts
from avss.evaluation.runner import EvalResult
from avss.healing.heal import HealConfig, heal_in_memory
from avss.healing.patch import check_patchable, linear_patch
from avss.io import atomic_write_json, ensure_parent_writable
from avss.models import LoadedModel, load_model
from avss.provenance import Provenance
from avss.pruning.rules import protected_layers
from avss.pruning.select import Selection, select_iteratively
from avss.pruning.sublayers import remove_sublayers
from avss.scorers import LayerImportance, Scorer, context_for
from avss.study import analysis
from avss.study.cells import RUN_IDENTITY, Cell, base_on, evaluation_path, tasks_folder
from avss.study.config import (
    ATTENTION,
    GROWABLE,
    HEALED,
    HEALING,
    ITERATIVE,
    ONESHOT,
    PATCHED,
    PROTECTED,
    StudyConfig,
    budget,
    repair_of,
    selection_name,
    with_defaults,
)
from avss.study.result import STUDY_FORMAT, StudyResult
from avss.study.selections import attention_budgets, oneshot_order, partial_path, selection_from_dict
from avss.threads import AUTO as AUTO_THREADS
from avss.threads import parse_threads, set_threads

PREFIX_FOLDER = ".prefix"  # recorded block inputs of the unpruned model while a study runs (then removed)


class Study:
    """Runs a :class:`StudyConfig` into an output folder, resuming whatever an earlier run finished."""

    def __init__(
        self,
        config: StudyConfig,
        out: str | Path,
        loaded: LoadedModel | None = None,
        progress: bool = True,
        log: Callable[[str], None] = lambda message: None,
        device: str = "auto",
        share_prefix: bool = True,
        resume: bool = False,
        threads: str | int = AUTO_THREADS,
    ):
        self.config = config
        self.device = device
        self.threads = parse_threads(threads)  # see adapts_threads
        self.resume = resume  # continue the study already in ``out`` (the one resume rule: --resume)
        self.share_prefix = share_prefix  # exact by construction; off only to check that it is
        self.out = Path(out)
        self.progress = progress
        self.log = log
        self._loaded = loaded
        self.cells: dict[str, Cell] = {}
        self.selections: dict[str, Selection] = {}
        self._importances: dict[str, LayerImportance] = {}  # one-shot scores measured in this run
        self.prefix: PrefixStore | None = None  # the unpruned model's recorded block inputs (run only)

    @property
    def loaded(self) -> LoadedModel:
        if self._loaded is None:
            self._loaded = load_model(
                self.config.model, device=self.device, dtype=self.config.dtype, threads=self.threads
            )
        return self._loaded

    @property
    def adapts_threads(self) -> bool:
        """Whether ``--threads auto`` is measured again before every cell, to use cores freed since the
        study started: on CPU in float32 only, where the count cannot change a result
        (:mod:`avss.threads`); a bfloat16 study keeps torch's default throughout."""
        source = self.loaded.source
        return (
            self.threads == AUTO_THREADS
            and source.get("device") == "cpu"
            and source.get("dtype") == "float32"
        )

    # --- folder ---------------------------------------------------------------------------------------

    def prepare(self, reading: bool = False) -> None:
        """Create the folder, or check that the study already in it is this one. A run continues it only
        with ``resume``, as every command continues only with ``--resume``; ``reading`` (a report) needs no
        flag."""
        if self.out.exists() and not self.out.is_dir():
            raise OutputError(f"--out {self.out} exists and is a file; choose a directory path")
        ensure_parent_writable(self.out / "config.json")
        try:
            for folder in (self.out, self.out / "cells", self.out / "selections"):
                folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"cannot create the study folder {self.out}: {exc.strerror or exc}") from exc
        path = self.out / "config.json"
        wanted = self.config.to_dict()
        if path.exists():
            # An option added to StudyConfig after the folder was written reads as its default there.
            stored = json.loads(path.read_text(encoding="utf-8"))
            found = with_defaults(stored, StudyConfig.option_defaults())
            changed = sorted(k for k in set(found) | set(wanted) if found.get(k) != wanted.get(k))
            grows = GROWABLE | HEALING if found.get("heal") is None else GROWABLE
            fixed = [key for key in changed if key not in grows]
            if fixed:
                raise OutputError(
                    f"{self.out} holds a different study (differs in {', '.join(fixed)}); "
                    "choose another --out or delete it"
                )
            if not (self.resume or reading):
                raise OutputError(
                    f"{self.out} holds this study already; continue it with --resume (finished cells are "
                    "kept) or choose another --out"
                )
            if changed:
                self.log(f"study grows ({', '.join(changed)}); finished cells are kept")
                atomic_write_json(path, wanted)
        else:
            atomic_write_json(path, wanted)
        for file in sorted((self.out / "cells").glob("*.json")):
            if file.name.endswith(".eval.json"):
                continue
            cell = Cell(**json.loads(file.read_text(encoding="utf-8")))
            self.cells[cell.key] = cell

    # --- selections -----------------------------------------------------------------------------------

    def select(self) -> None:
        """Every method's selection (one shared context for one-shot; one run per method for iterative)."""
        config = self.config
        model = self.loaded.model
        batches = self.calibration_batches
        scorers = config.scorers()
        num_layers = get_adapter(model).num_layers
        largest = budget(max(config.fractions), num_layers)
        if largest == 0:
            return
        shared = None
        everything = [*scorers, *config.attention_scorers()]
        for scorer in scorers:
            for mode in config.modes_of(scorer):
                name = selection_name(scorer, mode)
                path = self.out / "selections" / f"{name}.json"
                oneshot = mode in (ONESHOT, PROTECTED) or not scorer.uses_activations
                protect = protected_layers(num_layers, config.protect) if mode == PROTECTED else set()
                if path.exists():
                    stored = self._stored_selection(path, scorer, oneshot, protect, num_layers)
                    if stored is not None:
                        self.selections[name] = stored
                        continue
                    self.log(f"{name}: the stored selection does not reach the new budgets; selecting again")
                started = time.perf_counter()
                if oneshot:
                    importance = self._oneshot_importance(scorer)
                    if importance is None:
                        if shared is None:
                            shared = context_for(
                                model, batches, everything, cached=True, progress=self.progress
                            )
                        importance = self._importances[scorer.spec] = scorer.score(shared)
                    selection = oneshot_order(scorer, importance, config.fractions, protect)
                    selection.iterative = mode == ITERATIVE
                    seconds = time.perf_counter() - started
                else:
                    selection, seconds = self._iterative_selection(scorer, path, largest, num_layers)
                record = {**selection.to_dict(), "seconds": round(seconds, 3)}
                atomic_write_json(path, record)
                partial_path(path).unlink(missing_ok=True)
                self.selections[name] = selection
        for scorer in config.attention_scorers():
            name = selection_name(scorer, ATTENTION)
            path = self.out / "selections" / f"{name}.json"
            if path.exists():
                stored = selection_from_dict(json.loads(path.read_text(encoding="utf-8")))
                self.selections[name] = attention_budgets(stored, config.fractions, model)
                continue
            if shared is None:
                shared = context_for(model, batches, everything, cached=True, progress=self.progress)
            started = time.perf_counter()
            importance = scorer.score(shared)
            selection = Selection(scorer.spec, False, importance.ranking(), [importance])
            attention_budgets(selection, config.fractions, model)
            record = {**selection.to_dict(), "seconds": round(time.perf_counter() - started, 3)}
            atomic_write_json(path, record)
            self.selections[name] = selection

    def _iterative_selection(
        self, scorer: Scorer, path: Path, largest: int, num_layers: int
    ) -> tuple[Selection, float]:
        """An iterative selection to ``largest`` blocks and its seconds, those of earlier runs included (as a
        cell counts its finished tasks). Progress is kept in :func:`partial_path` after every step; a run
        that finds that file goes on from its last step (the calibration is the study's, which a resume
        cannot change)."""
        partial = partial_path(path)
        done, earlier = None, 0.0
        if partial.exists():
            stored = json.loads(partial.read_text(encoding="utf-8"))
            done, earlier = selection_from_dict(stored), stored["seconds"]
        steps = f"going on after {len(done.order)} steps, " if done else ""
        self.log(f"iterative selection: {scorer.spec} ({steps}removing {largest} of {num_layers})")
        started = time.perf_counter()
        context = context_for(
            copy.deepcopy(self.loaded.model), self.calibration_batches, [scorer], progress=self.progress
        )

        def seconds() -> float:
            return earlier + time.perf_counter() - started

        def save(selection: Selection) -> None:
            atomic_write_json(partial, {**selection.to_dict(), "seconds": round(seconds(), 3)})

        return select_iteratively(scorer, context, largest, done=done, on_step=save), seconds()

    def _stored_selection(
        self, path: Path, scorer: Scorer, oneshot: bool, protect: set[int], num_layers: int
    ) -> Selection | None:
        """The selection stored at ``path`` if it serves every budget of the (maybe grown) study, else None.

        A one-shot selection lacking a new budget gains it from its stored scores when the scorer's rule
        needs only the scores; an iterative one serves every budget up to the length of its removal order.
        """
        stored = json.loads(path.read_text(encoding="utf-8"))
        selection = selection_from_dict(stored)
        budgets = [n for f in self.config.fractions if (n := budget(f, num_layers))]
        if not oneshot:
            return selection if len(selection.order) >= max(budgets, default=0) else None
        missing = [n for n in budgets if n not in selection.by_budget]
        if not missing:
            return selection
        if not (scorer.selects_from_scores and selection.steps):
            return None
        for n in missing:
            selection.by_budget[n] = scorer.select(selection.steps[0], n, protect)
        atomic_write_json(path, {**stored, "by_budget": selection.by_budget})
        return selection

    def _oneshot_importance(self, scorer: Scorer) -> LayerImportance | None:
        """The scorer's one-shot scores if already measured: every one-shot mode (protected or not) selects
        from the same scores, so a leave-one-out pass is not run twice. A selection read from disk serves
        scorers whose rule needs only the scores (not angular distance's span search, which needs details)."""
        if scorer.spec in self._importances:
            return self._importances[scorer.spec]
        stored = self.selections.get(selection_name(scorer, ONESHOT))
        if stored is not None and stored.steps and scorer.selects_from_scores:
            return stored.steps[0]
        return None

    # --- cells ----------------------------------------------------------------------------------------

    def selection_names(self) -> list[str]:
        """The name of every selection the study's cells are drawn from (a file in ``selections/``)."""
        config = self.config
        return [
            *(selection_name(s, mode) for s in config.scorers() for mode in config.modes_of(s)),
            *(selection_name(s, ATTENTION) for s in config.attention_scorers()),
        ]

    def plan(self, reading: bool = False) -> list[tuple[str, str, float, list[int]]]:
        """(method, mode, fraction, removed layers) of every pruned cell, in run order.

        Budget-major order: every method at the smallest budget first, so a study cut short still compares
        all methods at the budgets it reached. ``reading`` (a report) leaves out the cells of selections
        not made yet: a study grown by a method and stopped before selecting reports what it has.
        """
        num_layers = self.num_layers
        cells = []
        for fraction in self.config.fractions:
            n = budget(fraction, num_layers)
            if n == 0:
                continue
            for scorer in self.config.scorers():
                for mode in self.config.modes_of(scorer):
                    name = selection_name(scorer, mode)
                    if reading and name not in self.selections:
                        continue
                    removed = self.selections[name].removed_for(n)
                    for repair in self.config.repairs_of(scorer):
                        if repair == PATCHED and 0 in removed:
                            continue  # a run from block 0 has no preceding MLP to carry the map
                        cells.append((scorer.spec, mode + repair, fraction, removed))
            for scorer in self.config.attention_scorers():
                name = selection_name(scorer, ATTENTION)
                if reading and name not in self.selections:
                    continue
                selection = self.selections[name]
                if n in selection.by_budget:  # absent: attention alone holds fewer parameters
                    cells.append((scorer.spec, ATTENTION, fraction, selection.removed_for(n)))
        return cells

    def evaluate_model(
        self,
        model: Any,
        around: Callable[[str], contextlib.AbstractContextManager[None]] | None = None,
        done: Mapping[str, EvalResult] | None = None,
        save_to: Path | None = None,
    ) -> EvalResult:
        """Every task of the study on ``model``, as one result with per-example records; each task's
        evaluation runs inside ``around(task)`` when given (recording or replaying the shared prefix).

        Tasks in ``done`` (:meth:`finished_tasks`) are taken as they are; with ``save_to``, each task
        evaluated now is saved there as soon as it ends.
        """
        config = self.config
        identity = self.run_identity()
        merged: EvalResult | None = None
        for task in config.tasks:
            result = (done or {}).get(task)
            if result is None:
                accepted = {f.name for f in fields(get_task(task))}
                options = {k: v for k, v in config.task_options.items() if k in accepted}
                with around(task) if around else contextlib.nullcontext():
                    result = evaluate(
                        model,
                        self.loaded.tokenizer,
                        [task],
                        limit=config.limits.get(task),
                        batch_size=config.eval_batch_size,
                        data_dir=config.data_dir,
                        seed=config.seed,
                        model_info=identity,
                        **options,
                    )
                if save_to is not None:
                    result.save(save_to / f"{task}.eval.json.gz")
            if merged is None:
                merged = result
            else:
                merged.tasks.update(result.tasks)
                merged.wall_time_s += result.wall_time_s
        assert merged is not None  # StudyConfig has at least one task
        return merged

    def run_identity(self) -> dict[str, Any]:
        """What an evaluation run now depends on besides the model's blocks (:data:`RUN_IDENTITY`); the
        thread count only where it can change a number (not under :attr:`adapts_threads`)."""
        source = self.loaded.source
        counts = source.get("device") == "cpu" and not self.adapts_threads
        threads = torch.get_num_threads() if counts else None
        return {key: source.get(key) for key in RUN_IDENTITY if key != "threads"} | {"threads": threads}

    def finished_tasks(self, folder: Path) -> dict[str, EvalResult]:
        """The tasks an interrupted run of a cell saved in ``folder`` that ran as they would run now (the
        same :data:`RUN_IDENTITY`); any other is evaluated again, and the log says why."""
        identity, done = self.run_identity(), {}
        for task in self.config.tasks:
            path = folder / f"{task}.eval.json.gz"
            if not path.exists():
                continue
            stored = EvalResult.load(path)
            ran = {key: stored.model.get(key) for key in RUN_IDENTITY}
            if ran == identity:
                self.log(f"{task}: read from {folder.name}, finished by an earlier run")
                done[task] = stored
            else:
                differs = ", ".join(f"{key} {ran[key]!r}" for key in ran if ran[key] != identity[key])
                self.log(f"{task}: the result in {folder.name} ran with {differs}; evaluating it again")
        return done

    @functools.cached_property
    def calibration_batches(self) -> list[dict[str, Any]]:
        """The calibration batches of the selections, reused by the linear patch's fit."""
        return list(self.config.calibration.batches(self.loaded.tokenizer, self.config.calibration_data))

    def run_cell(self, method: str, mode: str, fraction: float, removed: list[int]) -> Cell:
        repair = repair_of(mode)
        by_layers = {
            (tuple(cell.removed), repair_of(cell.mode), cell.mode == ATTENTION): cell
            for cell in self.cells.values()
            if cell.reused_from is None
        }
        cell = Cell(method, mode, fraction, removed, {}, 0.0)
        if cell.key in self.cells:
            return self.cells[cell.key]
        finished = tasks_folder(self.out, cell.key)
        twin = by_layers.get((tuple(removed), repair, mode == ATTENTION))
        if twin is not None:
            cell.metrics, cell.reused_from = twin.metrics, twin.key
        else:
            model = self.loaded.model
            if self.adapts_threads:
                set_threads(self.threads)
            if self.loaded.source.get("device") == "cpu":
                cell.threads, cell.processor = torch.get_num_threads(), self.loaded.source.get("processor")
            self.log(
                f"evaluating {cell.key}: removing {removed}"
                + (f" ({cell.threads} threads)" if cell.threads else "")
            )
            started = time.perf_counter()
            done = self.finished_tasks(finished)
            if removed:
                model = copy.deepcopy(model)
                if repair == PATCHED:
                    linear_patch(model, self.calibration_batches, removed, progress=self.progress)
                if mode == ATTENTION:
                    remove_sublayers(model, "attn", removed)
                else:
                    remove_layers(model, removed)
            if repair == HEALED:
                model = self.heal(model, removed)
            result = self.evaluate_model(model, self.prefix_replay(model, mode, removed), done, finished)
            result.save(evaluation_path(self.out, cell.key))
            cell.metrics = result.metrics
            # As if uninterrupted: this run's time and that of the tasks an earlier run finished.
            cell.seconds = round(time.perf_counter() - started + sum(r.wall_time_s for r in done.values()), 3)
            del model
        atomic_write_json(self.out / "cells" / f"{cell.key}.json", asdict(cell))
        shutil.rmtree(finished, ignore_errors=True)
        self.cells[cell.key] = cell
        return cell

    def heal(self, model: Any, removed: list[int]) -> Any:
        """Heal a pruned copy with the same budget for every method (``avss study --heal``)."""
        config = self.config
        result = heal_in_memory(
            model,
            self.loaded.tokenizer,
            removed,
            config.calibration_data.load(),
            HealConfig(method=config.heal or "lora", steps=config.heal_steps, seed=config.seed),
            teacher=self.loaded.model,
            progress=self.progress,
        )
        return result.model

    # --- whole study ----------------------------------------------------------------------------------

    def run(self) -> StudyResult:
        started = time.perf_counter()
        self.prepare()
        if self.config.patch:
            check_patchable(self.loaded.model)  # refuse a post-MLP-norm architecture before any cell
        self.select()
        try:
            self.record_prefix()
            pending = [spec for spec in self.plan() if Cell(*spec, {}, 0.0).key not in self.cells]
            for position, (method, mode, fraction, removed) in enumerate(pending, 1):
                cell = self.run_cell(method, mode, fraction, removed)
                if cell.reused_from is None:
                    self.log(f"{cell.key} done in {cell.seconds:.0f} s ({position} of {len(pending)} cells)")
        finally:
            shutil.rmtree(self.out / PREFIX_FOLDER, ignore_errors=True)
            self.prefix = None
        return self.report(started)

    # --- the shared prefix (avss.evaluation.prefix) -------------------------------------------------------

    def record_prefix(self) -> None:
        """Choose the blocks whose inputs the cells still to run start from, and run the base cell.

        The base cell records every chosen block's input; in a resumed study whose base is on disk, the first
        cell that passes a block records it (:meth:`PrefixStore.run`), so the unpruned model is evaluated
        again only on a processor that has no base of its own yet (:meth:`base_elsewhere`).
        """
        # One entry per block set still to evaluate: a cell repeating a finished (or pending) set is a twin.
        finished = {tuple(cell.removed) for cell in self.cells.values() if self.shares(cell.mode)}
        pending_sets = {
            tuple(removed): None
            for method, mode, fraction, removed in self.plan()
            if self.shares(mode) and tuple(removed) not in finished
        }
        pending = [min(removed) for removed in pending_sets]
        starts = choose_starts(pending) if self.share_prefix else []
        # A run killed before its clean-up leaves its recordings behind; none may stand for this run's.
        shutil.rmtree(self.out / PREFIX_FOLDER, ignore_errors=True)
        self.prefix = PrefixStore(self.out / PREFIX_FOLDER, starts) if starts else None
        if starts:
            self.log(f"sharing the inputs of blocks {starts} among {len(pending)} cells")
        if "base" not in self.cells:
            self.run_cell("base", ONESHOT, 0.0, [])
        elif self.processor_without_base() is not None:
            model = self.loaded.model
            self.base_elsewhere(self.evaluate_model(model, self.prefix_replay(model, ONESHOT, [])))

    def processor_without_base(self) -> str | None:
        """This machine's processor when the stored base cell ran on another (or an unrecorded) one and no
        base of this processor is filed yet; None otherwise (and on a GPU)."""
        here = self.loaded.source.get("processor")
        if here is None or here == self.cells["base"].processor:
            return None
        return None if evaluation_path(self.out, base_on(here)).exists() else here

    def base_elsewhere(self, again: EvalResult) -> None:
        """File the unpruned model as evaluated on this processor beside the stored base cell.

        Reduced-precision kernels differ between CPUs (bfloat16 on AMX against AVX-512), so a study resumed
        on another machine need not give the stored base to the bit; this machine's base is kept beside it
        (``base@<processor>``, once per processor), the cells run here are compared with it
        (:meth:`StudyResult.base_key`), and the machines' own difference can be measured.
        """
        stored, here = self.cells["base"].processor, self.loaded.source.get("processor")
        key = base_on(here)
        again.save(evaluation_path(self.out, key))
        same = "the same" if again.metrics == self.cells["base"].metrics else "other"
        self.log(
            f"the unpruned model gives {same} numbers on {here} as the stored base cell (evaluated on "
            f"{stored or 'an unrecorded processor'}); cells run here are compared with this machine's base, "
            f"cells/{key}.eval.json.gz"
        )

    def shares(self, mode: str) -> bool:
        """Whether a cell of ``mode`` runs blocks of the unpruned model unchanged before its first removed
        block (not when patched, healed or attention-only: those change or keep the earlier blocks)."""
        return mode != ATTENTION and not repair_of(mode)

    def prefix_replay(
        self, model: Any, mode: str, removed: list[int]
    ) -> Callable[[str], contextlib.AbstractContextManager[None]] | None:
        """How to evaluate a model with the shared prefix (:meth:`PrefixStore.run`: from the latest recorded
        block before its first removed one, recording the chosen blocks it passes), or None."""
        store = self.prefix
        if store is None or not self.shares(mode):
            return None
        first = min(removed) if removed else None
        return lambda task: store.run(model, task, first)

    def report(self, started: float | None = None) -> StudyResult:
        """Write the results of every finished cell; without a model when called alone (a study cut short).

        ``complete`` in ``results.json`` says whether every planned cell was there.
        """
        started = time.perf_counter() if started is None else started
        if not self.cells:
            if not (self.out / "config.json").is_file():
                raise OutputError(f"{self.out} holds no study to report; run the study first")
            self.prepare(reading=True)
        if "base" not in self.cells:
            raise OutputError(f"{self.out}: the unpruned model's cell is not finished yet; nothing to report")
        self.load_selections()
        planned = [Cell(*spec, {}, 0.0).key for spec in self.plan(reading=True)]
        unselected = [name for name in self.selection_names() if name not in self.selections]
        cells = [self.cells[key] for key in planned if key in self.cells]
        processors = {cell.processor for cell in cells if cell.processor}
        keys = ["base", *(base_on(p) for p in processors), *(cell.evaluated_key for cell in cells)]
        result = StudyResult(
            config=self.config,
            base=self.cells["base"],
            cells=cells,
            selections=self.selections,
            num_layers=self.num_layers,
            wall_time_s=round(time.perf_counter() - started, 3),
            provenance=Provenance.now(
                STUDY_FORMAT, model=self._loaded.source if self._loaded else {"name": self.config.model}
            ),
            complete=not unselected and all(key in self.cells for key in planned),
            evaluations=analysis.load_evaluations(self.out, keys),
        )
        result.write(self.out)
        return result

    def load_selections(self) -> None:
        for path in sorted((self.out / "selections").glob("*.json")):
            self.selections.setdefault(
                path.stem, selection_from_dict(json.loads(path.read_text(encoding="utf-8")))
            )

    @property
    def num_layers(self) -> int:
        """Depth of the unpruned model, read from a stored selection when there is one (no model load)."""
        for selection in self.selections.values():
            if selection.steps:
                return selection.steps[0].num_layers
        return get_adapter(self.loaded.model).num_layers
