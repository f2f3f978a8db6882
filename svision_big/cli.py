"""Command line: demo, convert, train, enhance, run, compare, view, info. Errors are one line and exit 2."""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys

from .ngff.format import DEFAULT_VERSION, SUPPORTED_VERSIONS
from .options import EnhanceSettings, TrainOptions, add_flags, cli_keywords
from .options import floats as _floats
from .options import ints as _ints
from .options import storage as _storage


def _factor(text: str):
    vals = _ints(text)
    return vals[0] if len(vals) == 1 else vals


def _add_tiff_flags(p: argparse.ArgumentParser) -> None:
    """What a TIFF input may not say about itself; the OME-Zarr it is converted to records it."""
    p.add_argument(
        "--voxel-size",
        type=_floats,
        help="a TIFF input's physical voxel size, Z,Y,X (Y,X in 2D; default: the file's, else 1, with a warning)",
    )
    p.add_argument("--unit", default=None, help="unit of --voxel-size (default: the file's, else micrometer)")


def _tiff_kwargs(a) -> dict:
    """--voxel-size / --unit for the conversion of a TIFF input: refused for an OME-Zarr input, whose
    metadata holds its sizes (they were not accepted at all, and a TIFF became 1 micrometer silently)."""
    given = {k: v for k, v in (("voxel_size", a.voxel_size), ("unit", a.unit)) if v is not None}
    if given:
        from .convert import is_tiff

        if not is_tiff(a.input):
            flags = " and ".join("--" + k.replace("_", "-") for k in given)
            raise ValueError(f"{flags}: only for a TIFF input; {a.input} carries its own (svision-big info shows them)")
    return given


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors as one line (``prog: error: ...``) instead of usage + error."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _add_log_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--progress",
        dest="progress_format",
        choices=["text", "json"],
        default="text",
        help="progress lines as text or as one JSON object per line (for cluster job logs)",
    )
    p.add_argument("--log-file", help="also append every progress line to this file")


_INPUT_OPTIONS = "JSON fsspec options for the input (e.g. an S3 endpoint)"


def _add_network_commands(sub) -> None:
    """train, enhance and run: their flags come from the declared options (``options.py``)."""
    p = sub.add_parser("train", help="train a model on a sampled region of an OME-Zarr image")
    _add_log_flags(p)
    p.add_argument("input", help="an OME-Zarr image (path or URL), or a TIFF (converted beside the model)")
    p.add_argument("-o", "--output", required=True, help="model file to write (.svb)")
    p.add_argument("--factor", type=_factor, required=True, help="2, 4, or per axis Z,Y,X such as 4,2,2")
    add_flags(p, TrainOptions, "train", exclude=("storage_options", "quiet"))
    _add_tiff_flags(p)
    add_flags(p, TrainOptions, "train", only=("storage_options",))
    p.add_argument("--overwrite", action="store_true", help="replace an existing model file")
    add_flags(p, TrainOptions, "train", only=("quiet",))

    p = sub.add_parser("enhance", help="enhance an OME-Zarr image with a trained model")
    _add_log_flags(p)
    p.add_argument("input", help="the OME-Zarr image to enhance (path or URL)")
    p.add_argument("output", help="the new, upsampled OME-Zarr image (path or URL)")
    p.add_argument("--model", required=True, action="append", help="model file; repeat once per channel")
    add_flags(p, EnhanceSettings, "enhance")

    p = sub.add_parser("run", help="train (one model per channel) and enhance")
    _add_log_flags(p)
    p.add_argument("input", help="an OME-Zarr image (path or URL), or a TIFF (converted beside the output)")
    p.add_argument("output", help="the new, upsampled OME-Zarr image (path or URL)")
    p.add_argument("--factor", type=_factor, required=True, help="2, 4, or per axis Z,Y,X such as 4,2,2")
    add_flags(p, TrainOptions, "run")
    _add_tiff_flags(p)
    add_flags(p, EnhanceSettings, "run")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="svision-big", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("demo", help="synthetic volume -> train -> enhance x2 -> PSNR/SSIM vs cubic")
    _add_log_flags(p)
    p.add_argument("dir", nargs="?", default="svision_demo", help="folder for the demo's files")
    p.add_argument("--steps", type=int, help="training steps (default: the standard budget)")
    p.add_argument(
        "--workers", type=int, default=None, help="task threads of the local Dask cluster (default: one per core)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace an earlier demo's outputs")

    p = sub.add_parser("convert", help="TIFF -> OME-Zarr pyramid")
    p.add_argument("input", help="the TIFF (OME-TIFF, ImageJ or plain)")
    p.add_argument("output", help="the OME-Zarr image to write")
    p.add_argument("--voxel-size", type=_floats, help="Z,Y,X physical voxel size")
    p.add_argument("--unit", default=None, help="unit of --voxel-size (default: the file's, else micrometer)")
    p.add_argument(
        "--channel-names",
        type=lambda t: [x.strip() for x in t.split(",")],
        help="comma list of channel names (default: the file's)",
    )
    p.add_argument(
        "--ngff",
        choices=SUPPORTED_VERSIONS,
        default=DEFAULT_VERSION,
        help=f"NGFF version to write: one of {', '.join(SUPPORTED_VERSIONS)} (default {DEFAULT_VERSION})",
    )
    p.add_argument("--axes", help="axes of the TIFF, e.g. zyx or czyx (default: from the file)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")

    _add_network_commands(sub)

    p = sub.add_parser("compare", help="figure + PSNR/SSIM table of a result against its input (and a truth)")
    p.add_argument("result", help="the enhanced OME-Zarr image")
    p.add_argument("input", help="the OME-Zarr image it was made from")
    p.add_argument("--truth", help="a reference OME-Zarr image at the result's resolution")
    p.add_argument("--png", default="compare.png", help="figure to write (default compare.png)")
    p.add_argument("--json", default=None, help="also write the numbers as JSON here")
    p.add_argument("--channel", type=int, default=0, help="the channel to show (default 0)")
    p.add_argument("--time", type=int, default=0, help="the time point to show (default 0)")
    p.add_argument(
        "--acquisition",
        choices=["cubic", "integrate", "sample"],
        help="how to degrade the result back onto the input (default: the result's provenance)",
    )
    p.add_argument(
        "--gamma",
        type=float,
        default=1.0,
        help="display gamma of the figure (default 1, linear; 0.5 lifts dim structure beside bright objects)",
    )
    p.add_argument("--storage-options", type=_storage, help=_INPUT_OPTIONS)
    p.add_argument("--quiet", action="store_true", help="no progress lines and no table")
    _add_log_flags(p)

    p = sub.add_parser("view", help="open the input and the enhanced output in napari, each at its true place")
    p.add_argument("input", help="the OME-Zarr image that was enhanced")
    p.add_argument("output", help="the enhanced OME-Zarr image")
    p.add_argument("--storage-options", type=_storage, help=_INPUT_OPTIONS)
    p.add_argument(
        "--output-storage-options",
        type=_storage,
        help="JSON fsspec options for the output (default: --storage-options)",
    )

    p = sub.add_parser("info", help="describe an OME-Zarr image")
    p.add_argument("path", help="an OME-Zarr image (path or URL)")
    p.add_argument("--storage-options", type=_storage, help=_INPUT_OPTIONS)
    return parser


def _quiet_cluster_client() -> None:
    """distributed's client logs a traceback per failed reconnect when the scheduler dies; the run
    reports that loss itself, in one line (execute.ClusterLost)."""
    import logging

    for name in ("distributed.client", "distributed.comm", "distributed.core", "distributed.batched"):
        logging.getLogger(name).setLevel(logging.CRITICAL)


class Terminated(KeyboardInterrupt):
    """SIGTERM (how SLURM, Kubernetes and dask-jobqueue stop a job), raised where Ctrl-C would be, so
    that the same clean-up runs: the lock released, the done-records kept for the resume."""


def _on_sigterm(signum, frame) -> None:
    raise Terminated


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import signal
    import threading

    on_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if on_main else None
    if getattr(args, "scheduler", None) not in (None, "sync"):
        import distributed  # noqa: F401 - its logging configuration first, then ours on top

        _quiet_cluster_client()
    from . import progress

    saved = dict(progress._SETTINGS)
    try:
        if hasattr(args, "progress_format"):
            progress.configure(args.progress_format, args.log_file)
        code = _dispatch(args)
        if argv is None and args.command == "compare":
            # the process ends here, its outputs written and closed: the collections Python runs at exit over the
            # objects torch, matplotlib and zarr made took 0.7-0.9 s of compare's 9-11 s (issue 28), frozen 0.2 s
            import gc

            gc.freeze()
        return code
    except KeyboardInterrupt as exc:
        how = "stopped by SIGTERM" if isinstance(exc, Terminated) else "interrupted"
        print(f"svision-big: {how} (re-run the same command to resume)", file=sys.stderr)
        return 143 if isinstance(exc, Terminated) else 130
    except Exception as exc:  # every failure is one line; SVISION_BIG_DEBUG=1 shows the traceback
        if os.environ.get("SVISION_BIG_DEBUG"):
            raise
        print(f"svision-big: error: {_one_line(exc, getattr(args, 'output', None))}", file=sys.stderr)
        return 2
    finally:
        progress._SETTINGS.update(saved)  # in-process callers (tests, notebooks) get their settings back
        if on_main:
            signal.signal(signal.SIGTERM, previous)


def _one_line(exc: BaseException, output: str | None = None) -> str:
    """The first line of an error; an error without words (or an internal one) is named by its type.
    A full disk names where, and how to go on (it said "[Errno 28] No space left on device" only)."""
    text = str(exc).strip()
    first = text.splitlines()[0] if text else ""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        where = f"for {output}" if output else "here"
        return (
            f"no space left on the device {where} ({exc.strerror or first}): free space, then re-run the same "
            "command to resume (the finished work is kept)"
        )
    if isinstance(exc, (ValueError, OSError, RuntimeError)) and first:
        return first
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def _check_model_output(path: str, overwrite: bool) -> None:
    """`train -o nodir/m.svb` trained in full, then failed naming a temp file: check the place first."""
    if os.path.isdir(path):
        raise ValueError(f"-o {path} is a directory: give a model file name, e.g. {os.path.join(path, 'model.svb')}")
    if os.path.exists(path) and not overwrite:
        raise ValueError(f"{path} already exists: pass --overwrite to replace it")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ValueError(f"-o {path}: the folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"-o {path}: the folder {folder} is not writable")


def _dispatch(a) -> int:
    if a.command == "info":
        from .ngff.image import describe

        print(describe(a.path, a.storage_options))
        return 0
    if a.command == "convert":
        from .convert import convert_tiff

        if not os.path.exists(a.input):
            raise ValueError(f"{a.input} does not exist")
        out = convert_tiff(
            a.input,
            a.output,
            voxel_size=a.voxel_size,
            unit=a.unit,
            ngff=a.ngff,
            overwrite=a.overwrite,
            axes=a.axes,
            channel_names=a.channel_names,
        )
        print(f"wrote {out}")
        return 0
    if a.command == "compare":
        from .compare import compare

        compare(
            a.result,
            a.input,
            truth=a.truth,
            out_png=a.png,
            out_json=a.json,
            channel=a.channel,
            time_index=a.time,
            acquisition=a.acquisition,
            storage_options=a.storage_options,
            gamma=a.gamma,
            quiet=a.quiet,
        )
        return 0
    if a.command == "view":
        from .view import view

        view(a.input, a.output, storage_options=a.storage_options, output_storage_options=a.output_storage_options)
        return 0
    from . import pipeline  # torch: only the commands that run a network import it

    if a.command == "train":  # before a TIFF is converted and before training (minutes), not after
        _check_model_output(a.output, a.overwrite)
    if a.command in ("train", "run"):  # an OME-TIFF / ImageJ TIFF is converted on the way, with its metadata
        from .convert import as_ome_zarr

        a.input = as_ome_zarr(a.input, near=a.output, quiet=a.quiet, **_tiff_kwargs(a))
    if a.command == "train":
        from .checkpoint import Checkpoints

        ckpt = Checkpoints(f"{a.output}.ckpt")  # beside the model: an interrupted training resumes from it
        model = pipeline.train(a.input, a.factor, checkpoint_dir=ckpt, **cli_keywords(a, TrainOptions, "train"))
        model.save(a.output)
        ckpt.clear()
        from .progress import decision

        decision(
            f"wrote {a.output} (model {model.hash}); settings: {json.dumps(model.settings())}",
            "done",
            output=a.output,
            model=model.hash,
        )
        return 0
    if a.command == "enhance":
        model = a.model if len(a.model) > 1 else a.model[0]
        stats = pipeline.enhance(a.input, a.output, model, **cli_keywords(a, EnhanceSettings, "enhance"))
        _report(stats)
        return 0
    if a.command == "run":
        kw = {**cli_keywords(a, TrainOptions, "run"), **cli_keywords(a, EnhanceSettings, "run")}
        stats = pipeline.run(a.input, a.output, a.factor, **kw)
        _report(stats)
        return 0
    if a.command == "demo":
        from .demo import demo

        demo(a.dir, steps=a.steps, workers=a.workers, overwrite=a.overwrite)
        return 0
    raise ValueError(f"unknown command {a.command}")


def _report(stats: dict) -> None:
    """The command's closing lines: on standard output, and under ``--progress json`` / ``--log-file``
    as ``{"event": "decision", "kind": "done"}`` records (a job log had only the progress lines)."""
    from .progress import decision

    if stats.get("state") == "already complete":
        decision(
            f"{stats['output']} is already complete (fingerprint {stats['fingerprint']}); nothing to do",
            "done",
            output=stats["output"],
            state="already complete",
        )
        return
    total = stats.get("total", stats)  # every pass: a resume skips the earlier passes' blocks too
    per_pass = "; ".join(
        f"pass {k + 1}: {q['computed']} computed, {q['skipped']} done" for k, q in enumerate(stats.get("passes", []))
    )
    found = "".join(
        f", {stats[k]:,} {what}"
        for k, what in (
            ("input_nonfinite", "NaN/Inf input voxels read as the fill value"),
            ("input_missing_chunks", "input chunks missing"),
            ("background", "blocks in the background written without the network"),
        )
        if stats.get(k)
    )
    decision(
        f"wrote {stats['output']}: {total['computed']} blocks computed, {total['skipped']} already done "
        f"over {len(stats.get('passes', [])) or 1} pass(es) ({per_pass}){found}, "
        f"{stats['voxels_per_second'] / 1e6:.2f} M output voxels/s, levels {stats['levels']}, "
        f"{stats['seconds']:.1f} s + pyramid {stats['pyramid_seconds']:.1f} s",
        "done",
        output=stats["output"],
        computed=total["computed"],
        skipped=total["skipped"],
        levels=stats["levels"],
        seconds=stats["seconds"],
    )
    if stats.get("models"):
        decision(
            f"kept the trained model{'s' if len(stats['models']) > 1 else ''}: {', '.join(stats['models'])}",
            "done",
            output=stats["output"],
            models=list(stats["models"]),
        )


if __name__ == "__main__":
    sys.exit(main())
