"""``enhance``: the run resolved once (``request.resolve``), the output prepared under its lock,
one job per pass, the passes run in order, then the pyramid and the metadata (``finish``)."""

from __future__ import annotations

import os
import sys

from .. import background as bgd
from ..execute import Job, execute
from ..ngff import NgffError, open_output_group
from ..options import EnhanceSettings, defaults, keywords, signature
from ..passes import IMAGE, output_name, readers
from ..progress import decision
from .cluster import _check_device, _close, _open_cluster
from .finish import _already_complete, _finish_output
from .layout import _axis_names, scratch_arrays
from .request import EnhanceRun, _check_models_outside, resolve


def enhance(input: str | os.PathLike, output: str | os.PathLike, model, **options) -> dict:
    """Enhance an OME-Zarr image into a new, upsampled, multiscale OME-Zarr image.

    ``model``: a Model, a model path, or a list of them (one per channel). ``scheduler``: a Dask
    scheduler address, or "sync" to run in this process; otherwise a local cluster of ``workers``.
    ``precision``: the networks' arithmetic, "float32" (the default and reference:
    ``operator.DEFAULT_PRECISION``), "bfloat16" (faster on CPUs with AVX512-BF16; see
    ``operator.precision_dtype``) or "auto" (bfloat16 where the CPU has it natively, else float32:
    ``operator.resolve_precision``; the provenance records the choice). ``force``: run blocks too small for their
    halo. ``break_lock``: take the output's lock even from a live run or another host. ``nonfinite``:
    NaN/Inf in a float input stop the run ("error") or read as the fill value ("fill", counted in
    the provenance). ``strict``: a missing input chunk stops the run (else: counted, warned about).
    ``skip_background``: True (or "auto") writes blocks whose input lies in the background (decided on
    a coarse pyramid level, threshold from the model's normalisation) as their cubic upsampling,
    without the network; a number is the threshold in raw input units (``docs/sparse.md``).
    The output is locked (``state.OutputLock``) from before its first write to the end. The keywords
    are those of :class:`EnhanceSettings` (``options.py``); ``enhance_with`` takes them as one.
    """
    return enhance_with(input, output, model, keywords("enhance", EnhanceSettings, options))


enhance.__signature__ = signature(("input", "output", "model"), defaults(EnhanceSettings))


def enhance_with(input: str | os.PathLike, output: str | os.PathLike, model, settings: EnhanceSettings) -> dict:
    """``enhance`` with its settings as one :class:`EnhanceSettings`."""
    r = resolve(os.fspath(input), os.fspath(output), model, settings)
    s = r.settings
    lock = r.state.lock(s.break_lock)
    verdict = r.state.checked_verdict(r.fp, s.overwrite, lock, r.provenance["input_digest"], r.provenance["identity"])
    if verdict == "replace":
        _check_models_outside(model, r.output)
    if (
        verdict == "resume" and r.state.provenance().get("state") == "complete" and not r.state.has_leftovers()
    ):  # reads only: no lock, no cluster
        return _already_complete(r)
    cl, owned = _open_cluster(s.client, s.workers, s.scheduler)  # a wrong --scheduler fails before any write
    held = None
    try:
        if cl is not None and s.client is None and s.scheduler not in (None, "sync"):
            _check_device(s.device, cl)  # the workers of a cluster given by address
        held = lock.acquire()  # before the output's first write, until its last
        group, resuming = _prepare_output(r)
        if group is None:
            return _already_complete(r)
        jobs = _jobs(r)
        if s.progress:
            _announce(r, resuming)
        stats, notes = _run_passes(jobs, r, cl)
        return _finish_output(r, group, {**r.provenance, **(s.provenance_extra or {}), **notes}, stats, cl)
    finally:
        _close(owned, held)


def _prepare_output(r: EnhanceRun):
    """Under the lock: set up a new output (or clear and set up again), or reopen one to resume.
    Returns (group, resuming), or (None, True) when the output turns out complete."""
    state, lay, s, fp = r.state, r.lay, r.settings, r.fp
    verdict = state.verdict(fp, s.overwrite, r.provenance["input_digest"], r.provenance["identity"])  # under the lock
    if verdict in ("replace", "restart"):
        state.clear()
    scratch = scratch_arrays(r.image, r.outer, lay, lambda k: state.scratch_path(fp, k))

    def level0(group):
        lay.fmt.create_array(
            group,
            "0",
            lay.shape,
            lay.chunks,
            lay.dtype,
            _axis_names(r.image),
            shards=lay.shards,
            compression=s.compression,
        )

    if verdict != "resume":
        provenance = {**r.provenance, **(s.provenance_extra or {})}
        return state.set_up(lay.fmt, fp, provenance, scratch, level0, after_step=_after_setup_step), False
    group = open_output_group(state.output, lay.fmt, state.options, mode="a")
    if group.attrs.get("svision_big", {}).get("state") == "complete":
        state.clean(keep_models=True)
        return None, True
    state.ensure_arrays(group, scratch, level0)
    return group, True


def _after_setup_step(step: str) -> None:
    """Called after each step of setting up a new output. Nothing happens here: tests replace it to
    kill a run at each step and check the re-run completes."""


def _jobs(r: EnhanceRun) -> list[Job]:
    """One job per pass: where it reads each of its inputs, where it writes, where its done-records go."""
    image, lay, s, state, fp = r.image, r.lay, r.settings, r.state, r.fp
    last = len(lay.passes) - 1
    where = {
        IMAGE: (r.input, image.paths[0]),
        output_name(last): (r.output, "0"),
        **{output_name(k): (r.output, state.scratch_path(fp, k)) for k in range(last)},
    }
    coarse = _coarse_levels(image)
    base = dict(
        out_url=r.output,
        spatial_axes=tuple(image.spatial_axes),
        outer_axes=r.outer.axes,
        outer_offsets=r.outer.offsets,
        models=tuple(m.hash for m in r.models),
        model_axis=r.outer.model_axis,
        out_dtype=lay.dtype,
        in_options=s.storage_options,
        out_options=s.output_storage_options,
        device=s.device,
        precision=s.precision,
        nonfinite=s.nonfinite,
        strict=s.strict,
    )
    fill = bgd.Fill(r.input, image.paths[0], tuple(r.models[0].factors)) if r.skip is not None else None
    return [
        Job(
            **base,
            in_url=where[p.source][0],
            in_path=where[p.source][1],
            out_path=where[output_name(k)][1],
            plan=pl,
            done_url=state.done_url(fp, k),
            pass_=p,
            in_raw=p.source == IMAGE,
            out_raw=k == last,
            companion_path=where[p.companion][1] if p.companion else None,
            fill=fill if k == last else None,
            coarse_levels=coarse if p.source == IMAGE else (),
        )
        for k, (p, pl) in enumerate(zip(lay.passes, lay.plans))
    ]


def _coarse_levels(image) -> tuple[tuple[str, tuple[float, ...]], ...]:
    """The input's levels above level 0 that open, with the per-axis ratio of level 0's shape to theirs
    (what tells an absent chunk's emptiness, ``chunks.empty_on_coarser_levels``). They are a help,
    not a need: a level that does not open ends the list, it does not fail the run."""
    shape0 = image.level(0).shape
    out = []
    for i in range(1, image.nlevels):
        try:
            shape = image.level(i).shape
        except NgffError:
            break
        out.append((image.paths[i], tuple(n0 / max(1, n) for n0, n in zip(shape0, shape))))
    return tuple(out)


def _announce(r: EnhanceRun, resuming: bool) -> None:
    lay, skip = r.lay, r.skip
    decision(
        f"enhance: factors {r.models[0].factors}, {'resuming' if resuming else 'new output'} {r.output}; "
        f"{len(lay.passes)} pass(es):",
        "plan",
        resuming=resuming,
    )
    for k, (p, pl) in enumerate(zip(lay.passes, lay.plans)):
        bg = f", {skip.counts()[k]} in the background (no network)" if skip is not None else ""
        decision(
            f"  {p.label}: {len(pl)} blocks of {pl.block} output voxels, halo {pl.halo} input voxels "
            f"(halo overhead {pl.overhead():.0%}){bg}",
            "plan",
            blocks=len(pl),
        )
    if skip is not None:
        decision(
            f"  --skip-background: threshold {', '.join(f'{t:g}' for t in skip.thresholds)} "
            f"({'auto' if skip.auto else 'given'}), decided on input level {skip.level}",
            "skip-background",
            thresholds=list(skip.thresholds),
        )


def _run_passes(jobs: list[Job], r: EnhanceRun, cl) -> tuple[dict, dict]:
    """Every pass in turn, each staged output removed once no remaining pass reads it. Returns the
    stats, and the notes the provenance records about the input as read."""
    s, skip = r.settings, r.skip
    passes = [j.pass_ for j in jobs]
    last = len(jobs) - 1
    stats: dict = {"passes": []}
    for k, (p, job) in enumerate(zip(passes, jobs)):
        q = execute(
            job,
            {m.hash: m for m in r.models},
            client=cl,
            progress=s.progress,
            on_block=s.on_block if k == last else None,
            label=f"pass {k + 1}/{len(jobs)} {p.label}",
            background=None if skip is None else skip.flat(k),
        )
        stats["passes"].append({"kind": p.kind, "stage": p.stage, **q})
        for j in range(min(k + 1, last)):
            if all(i <= k for i in readers(passes, j)):
                r.state.remove(jobs[j].out_path)
    return _pass_stats(stats, skip is not None, r.input)


def _pass_stats(stats: dict, skipping: bool, input: str) -> tuple[dict, dict]:
    """The totals over the passes, and the notes the provenance records about the input as read."""
    final = stats["passes"][-1]
    total_s = sum(q["seconds"] for q in stats["passes"])
    stats.update({k: final[k] for k in ("blocks", "skipped", "computed", "todo_at_start", "output_voxels")})
    # the level-0 pass above (the API's meaning); every pass here: a resume skips earlier passes too
    stats["total"] = {k: sum(q[k] for q in stats["passes"]) for k in ("blocks", "skipped", "computed")}
    if skipping:  # blocks written without the network: the last pass's (its output), and every pass's
        stats["background"] = final.get("background", 0)
        stats["total"]["background"] = sum(q.get("background", 0) for q in stats["passes"])
    notes = _run_notes(stats["passes"])
    if notes.get("input_missing_chunks"):
        print(
            f"svision-big: warning: {notes['input_missing_chunks']} chunks of {input} are missing and were read "
            f"as the fill value (e.g. {', '.join(notes['input_missing_examples'])}); --strict makes this an error",
            file=sys.stderr,
            flush=True,
        )
    stats.update({k: notes[k] for k in ("input_nonfinite", "input_missing_chunks") if k in notes})
    stats["seconds"] = round(total_s, 3)
    stats["voxels_per_second"] = final["output_voxels"] / total_s if total_s > 0 else 0.0
    return stats, notes


def _run_notes(passes: list[dict]) -> dict:
    """What provenance records about the input as read (non-finite values, missing chunks)."""
    notes: dict = {}
    for key in ("nonfinite", "missing_chunks"):
        n = max((q.get(key, 0) for q in passes), default=0)  # every pass that reads the input sees all of it
        if n:
            notes[f"input_{key}"] = n
    examples = next((q["missing_examples"] for q in passes if q.get("missing_examples")), None)
    if examples:
        notes["input_missing_examples"] = examples
    return notes
