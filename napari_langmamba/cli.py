"""``napari-langmamba``: the headless commands (denoise, info, demo).

The CLI is the only place that chooses exit codes: 0 on success, 2 with a one-line
``error: ...`` on stderr for anything the user can fix (a :class:`LangMambaError`: bad input,
missing weights, an output that would overwrite something), 130 when interrupted. It consumes
the same progress generators as the widgets, drawing them as tqdm bars on stderr.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import platform
import sys
import tempfile
import time
from collections.abc import Generator, Sequence
from datetime import datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, TypeVar

from napari_langmamba import __version__
from napari_langmamba.errors import ConfigError, CTWriteError, LangMambaError
from napari_langmamba.events import Progress, run
from napari_langmamba.strength import DEFAULT_STRENGTH, blend, check_strength, derived_description

logger = logging.getLogger(__name__)

T = TypeVar("T")

FORMATS = ("dicom", "nifti", "npy")
REPO_ROOT = Path(__file__).resolve().parents[1]
DEMO_SERIES = REPO_ROOT.parent / "shared" / "data" / "ct" / "abdomen_dicom_series"
"""The real sample series next to a source checkout (absent in an installed copy)."""


# --- helpers -----------------------------------------------------------------------------------
def _drive(generator: Generator[Progress, None, T], *, desc: str, unit: str, quiet: bool) -> T:
    """Run a progress generator with a tqdm bar on stderr."""
    from tqdm import tqdm

    with tqdm(desc=desc, unit=unit, disable=True if quiet else None, file=sys.stderr, leave=False) as bar:

        def update(event: Progress) -> None:
            if event.total > 0 and bar.total != event.total:
                bar.total = event.total
            bar.n = event.done
            bar.refresh()

        return run(generator, update)


def _parse_series(value: str | None) -> str | int | None:
    """``--series``: an integer index, or a SeriesInstanceUID (digits and dots)."""
    if value is None:
        return None
    return int(value) if value.strip().isdigit() else value.strip()


def _format_for(output: Path, requested: str | None) -> str:
    if requested is not None:
        return requested
    name = output.name.lower()
    if name.endswith((".nii", ".nii.gz")):
        return "nifti"
    if name.endswith(".npy"):
        return "npy"
    return "dicom"


def _is_within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_output(input_path: Path, output: Path, *, overwrite: bool) -> None:
    """Refuse outputs that would overwrite (or mix into) the input or existing data.

    Raises
    ------
    CTWriteError
        OUTPUT is the input, lies inside the input folder, contains the input, or exists
        (a file or a non-empty folder) without ``overwrite``.
    """
    source, target = input_path.resolve(), output.resolve()
    if target == source:
        raise CTWriteError(f"The output {output} is the input itself; choose another output path.")
    if source.is_dir() and _is_within(target, source):
        raise CTWriteError(
            f"The output {output} lies inside the input folder {input_path}; a derived series there "
            "would be mixed up with the original. Choose a path outside it."
        )
    if _is_within(source, target):
        raise CTWriteError(
            f"The output {output} contains the input {input_path}; writing there could destroy it. "
            "Choose another output path."
        )
    exists = target.is_file() or (target.is_dir() and any(target.iterdir()))
    if exists and not overwrite:
        raise CTWriteError(
            f"The output {output} already exists; choose a new path or pass --overwrite to replace it."
        )


def _description(volume: Any, info: dict, strength: float = DEFAULT_STRENGTH) -> str:
    """SeriesDescription of the derived series: the original's plus the model and strength, within 64 chars."""
    return derived_description(volume.metadata.get("SeriesDescription"), info, strength)


def _input_is_dicom(volume: Any, path: Path) -> bool:
    fmt = volume.metadata.get("source_format")
    if isinstance(fmt, str):
        return fmt.lower() == "dicom"
    return path.is_dir() or not path.name.lower().endswith((".nii", ".nii.gz", ".npy"))


@dataclasses.dataclass(frozen=True)
class DenoiseResult:
    """What :func:`denoise_file` did: where the output went and how long each step took."""

    output: Path
    format: str
    n_slices: int
    seconds_read: float
    seconds_load: float
    seconds_denoise: float
    seconds_write: float
    model: dict
    strength: float = DEFAULT_STRENGTH
    self_ensemble: bool = False

    @property
    def seconds_total(self) -> float:
        return self.seconds_read + self.seconds_load + self.seconds_denoise + self.seconds_write


def denoise_file(
    input_path: str | Path,
    output: str | Path,
    *,
    weights: str | Path = "default",
    device: str = "auto",
    batch_size: int | None = None,
    tile: int | None = None,
    format: str | None = None,
    series: str | int | None = None,
    overwrite: bool = False,
    quiet: bool = False,
    strength: float = DEFAULT_STRENGTH,
    self_ensemble: bool = False,
) -> DenoiseResult:
    """Read a CT, denoise it and write the result (the ``denoise`` command without argv).

    The output never replaces its input: see :func:`check_output`. A DICOM input written as
    DICOM becomes a derived series of it (new UIDs, same geometry, the model in
    SeriesDescription). ``strength`` (percent) keeps that much of the model's change:
    ``input + strength/100 * (denoised - input)``. ``self_ensemble`` averages the model over
    the 8 flips and rotations of each slice (8 times the time).
    """
    from napari_langmamba import io
    from napari_langmamba.inference import DEFAULT_TILE, Denoiser
    from napari_langmamba.session import derived_volume

    input_path, output = Path(input_path).expanduser(), Path(output).expanduser()
    if format is not None and format not in FORMATS:
        raise ConfigError(f"Unknown output format {format!r}; choose one of {', '.join(FORMATS)}.")
    if batch_size is not None and batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1; got {batch_size}.")
    strength = check_strength(strength)
    if not input_path.exists():
        raise ConfigError(f"The input {input_path} does not exist.")
    fmt = _format_for(output, format)
    check_output(input_path, output, overwrite=overwrite)

    # The model first: a bad checkpoint or device fails before minutes of reading.
    start = time.perf_counter()
    denoiser = Denoiser.load(weights, device=device)
    load_done = time.perf_counter()
    volume = _drive(io.iter_read_ct(input_path, series=series), desc="reading", unit="slice", quiet=quiet)
    read_done = time.perf_counter()
    _warn_unseen_kernel(denoiser, volume)
    hu = _drive(
        denoiser.iter_denoise(volume.hu, batch_size=batch_size, tile=tile or DEFAULT_TILE,
                              self_ensemble=self_ensemble),
        desc="denoising",
        unit="img",
        quiet=quiet,
    )
    hu = blend(volume.hu, hu, strength)
    denoise_done = time.perf_counter()
    result = derived_volume(volume, hu)
    reference = volume if fmt == "dicom" and _input_is_dicom(volume, input_path) else None
    written = io.write_ct(
        result,
        output,
        format=fmt,
        overwrite=overwrite,
        reference=reference,
        description=_description(volume, denoiser.info, strength),
    )
    write_done = time.perf_counter()
    return DenoiseResult(
        output=Path(written),
        format=fmt,
        n_slices=int(hu.shape[0]),
        seconds_read=read_done - load_done,
        seconds_load=load_done - start,
        seconds_denoise=denoise_done - read_done,
        seconds_write=write_done - denoise_done,
        model=dict(denoiser.info),
        strength=strength,
        self_ensemble=bool(self_ensemble),
    )


def _warn_unseen_kernel(denoiser: Any, volume: Any) -> None:
    """On stderr: the series' kernel is not one the model was trained on (see ``kernel_advice``)."""
    from napari_langmamba.inference import kernel_advice, series_kernel

    advice = kernel_advice(denoiser.info.get("trained_kernels"), series_kernel(volume.metadata),
                           weights=denoiser.info.get("weights"))
    if advice:
        print(f"warning: {advice}", file=sys.stderr)


# --- commands ----------------------------------------------------------------------------------
def cmd_denoise(args: argparse.Namespace) -> int:
    result = denoise_file(
        args.input,
        args.output,
        weights=args.weights,
        device=args.device,
        batch_size=args.batch_size,
        tile=args.tile,
        format=args.format,
        series=_parse_series(args.series),
        overwrite=args.overwrite,
        quiet=args.quiet,
        strength=args.strength,
        self_ensemble=args.self_ensemble,
    )
    print(
        f"Denoised {result.n_slices} slice(s) with {result.model.get('kind')} "
        f"{result.model.get('preset') or ''}{' (self-ensemble of 8)' if result.self_ensemble else ''} "
        f"at {result.strength:g}% strength on {result.model.get('device')} in "
        f"{result.seconds_denoise:.1f} s ({result.seconds_total:.1f} s in all); "
        f"wrote {result.format} to {result.output}"
    )
    return 0


def _package_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def info_lines() -> list[str]:
    """What ``napari-langmamba info`` prints: versions, devices, scan backend, default weights."""
    import torch

    from napari_langmamba.session import (
        DEFAULT_WEIGHTS_DIR,
        available_devices,
        default_weights_info,
        resolve_device,
        resolve_weights,
    )

    lines = [
        f"napari-langmamba {__version__}",
        f"python {platform.python_version()} ({sys.executable})",
        f"torch {torch.__version__}, napari {_package_version('napari')}, numpy {_package_version('numpy')}",
    ]
    devices = available_devices()
    details = [f"cpu ({torch.get_num_threads()} threads)"]
    if "cuda" in devices:
        details += [f"cuda:{i} {torch.cuda.get_device_name(i)}" for i in range(torch.cuda.device_count())]
    if "mps" in devices:
        details.append("mps")
    lines.append(f"devices: {', '.join(details)}; auto picks {resolve_device('auto')}")
    try:
        from napari_langmamba.models.scan import scan_backend

        backends = ", ".join(f"{d}: {scan_backend(torch.device(d))}" for d in devices)
        lines.append(f"scan backend: {backends}")
    except ImportError as exc:
        lines.append(f"scan backend: unavailable ({exc})")
    try:
        config = default_weights_info()
    except LangMambaError as exc:
        config, problem = None, str(exc)
    else:
        problem = f"missing (expected a checkpoint folder at {DEFAULT_WEIGHTS_DIR})"
    if config is None:
        lines.append(f"default weights: {problem}")
    else:
        lines.append(f"default weights: {DEFAULT_WEIGHTS_DIR}")
        for key, value in config.items():
            text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
            if len(text) > 300:
                text = text[:297] + "..."
            lines.append(f"  {key}: {text}")
    try:
        lines.append(f"sharp-kernel weights (--weights sharp): {resolve_weights('sharp')}")
    except LangMambaError as exc:
        lines.append(f"sharp-kernel weights (--weights sharp): {exc}")
    return lines


def cmd_info(args: argparse.Namespace) -> int:
    print("\n".join(info_lines()))
    return 0


def _fresh_folder(parent: Path) -> Path:
    """A new, empty folder ``parent/demo-<time>`` (numbered if taken); a temp dir if unwritable."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        for n in range(1000):
            candidate = parent / (f"demo-{stamp}" if n == 0 else f"demo-{stamp}-{n}")
            try:
                candidate.mkdir()
            except FileExistsError:
                continue
            return candidate
    except OSError as exc:
        logger.warning("cannot create a folder under %s (%s); using a temporary folder", parent, exc)
    return Path(tempfile.mkdtemp(prefix="napari-langmamba-demo-"))


def _demo_input(quiet: bool) -> tuple[Any, str]:
    """The demo CT: the real series next to the checkout, else the plugin's sample slice."""
    from napari_langmamba import io

    if DEMO_SERIES.is_dir():
        volume = _drive(io.iter_read_ct(DEMO_SERIES), desc="reading", unit="slice", quiet=quiet)
        return volume, str(DEMO_SERIES)
    return io.load_sample("abdomen"), "the plugin's abdominal sample slice (pydicom-data)"


def cmd_demo(args: argparse.Namespace) -> int:
    from napari_langmamba import io
    from napari_langmamba.inference import Denoiser
    from napari_langmamba.session import derived_volume, resolve_weights

    try:
        resolve_weights("default")
    except LangMambaError as exc:
        raise LangMambaError(
            f"{exc} The demo needs them; meanwhile denoise with your own checkpoint: "
            "napari-langmamba denoise INPUT -o OUTPUT --weights CHECKPOINT"
        ) from None
    start = time.perf_counter()
    volume, described = _demo_input(args.quiet)
    denoiser = Denoiser.load("default", device=args.device)
    loaded = time.perf_counter()
    _warn_unseen_kernel(denoiser, volume)
    hu = _drive(
        denoiser.iter_denoise(volume.hu, batch_size=args.batch_size),
        desc="denoising",
        unit="img",
        quiet=args.quiet,
    )
    denoised = time.perf_counter()
    folder = _fresh_folder(Path(args.output))
    result = derived_volume(volume, hu)
    written = io.write_ct(
        result,
        folder / "denoised_dicom",
        format="dicom",
        reference=volume,
        description=_description(volume, denoiser.info),
    )
    summary = {
        "input": described,
        "output": str(written),
        "slices": int(hu.shape[0]),
        "shape": list(hu.shape),
        "seconds_denoise": round(denoised - loaded, 3),
        "seconds_total": round(time.perf_counter() - start, 3),
        "model": denoiser.info,
    }
    (folder / "demo.json").write_text(json.dumps(summary, indent=2, default=str) + "\n", encoding="utf-8")
    print(
        f"Denoised {summary['slices']} slice(s) of {described} with the default weights "
        f"({denoiser.info.get('kind')} {denoiser.info.get('preset') or ''}, {denoiser.info.get('device')}) "
        f"in {summary['seconds_denoise']:.1f} s ({summary['seconds_total']:.1f} s in all).\n"
        f"Result (derived DICOM series): {written}\nDetails: {folder / 'demo.json'}"
    )
    return 0


# --- parser and entry point --------------------------------------------------------------------
def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected at least 1, got {value}")
    return value


def _percent(text: str) -> float:
    try:
        return check_strength(text.strip().rstrip("%"))
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="napari-langmamba",
        description="Language-guided low-dose CT denoising (LangMamba) without a display.",
    )
    parser.add_argument("--version", action="version", version=f"napari-langmamba {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what happens (INFO level)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    denoise = sub.add_parser(
        "denoise",
        help="denoise a CT (DICOM series, NIfTI or .npy) and write the result",
        description=(
            "Denoise a CT and write the result. A DICOM input written as DICOM becomes a derived "
            "series (same geometry, new UIDs, the model named in SeriesDescription). The input is "
            "never overwritten."
        ),
    )
    denoise.add_argument(
        "input", type=Path, metavar="INPUT", help="DICOM file or folder, .nii/.nii.gz or .npy (HU)"
    )
    denoise.add_argument(
        "-o",
        "--output",
        type=Path,
        required=True,
        metavar="OUTPUT",
        help="output folder (DICOM) or file (.nii.gz, .npy); must not exist unless --overwrite",
    )
    denoise.add_argument(
        "--weights",
        default="default",
        metavar="W",
        help="'default' (bundled), 'sharp' (bundled, for sharp kernels such as B70f), a checkpoint folder or .zip, "
        "or a training run folder (default: %(default)s)",
    )
    denoise.add_argument(
        "--device", default="auto", metavar="D", help="auto, cpu, cuda, cuda:N or mps (default: auto)"
    )
    denoise.add_argument(
        "--batch-size",
        type=_positive_int,
        default=None,
        metavar="N",
        help="slices per batch (default: 1 on CPU, 4 on CUDA)",
    )
    denoise.add_argument(
        "--tile",
        type=_positive_int,
        default=None,
        metavar="PX",
        help="largest image side fed at once; bigger slices are tiled (default: 512)",
    )
    denoise.add_argument(
        "--format",
        choices=FORMATS,
        default=None,
        help="output format (default: from OUTPUT's extension, else dicom)",
    )
    denoise.add_argument(
        "--series", default=None, metavar="UID|INDEX", help="which series of a multi-series folder"
    )
    denoise.add_argument(
        "--overwrite", action="store_true", help="replace an existing OUTPUT (never the input)"
    )
    denoise.add_argument(
        "--strength",
        type=_percent,
        default=DEFAULT_STRENGTH,
        metavar="PCT",
        help="denoising strength in percent, 0-100: output = input + PCT/100 x (denoised - input), "
        "e.g. 50 keeps half of the original texture (default: %(default)g)",
    )
    denoise.add_argument(
        "--self-ensemble",
        action="store_true",
        help="average the model over the 8 flips and 90-degree rotations of each slice: 8 times the time, "
        "a slightly better estimate (+0.1 dB PSNR for the bundled model on its validation patient)",
    )
    denoise.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    denoise.set_defaults(func=cmd_denoise)

    info = sub.add_parser("info", help="versions, devices, scan backend and the default weights' provenance")
    info.set_defaults(func=cmd_info)

    demo = sub.add_parser(
        "demo",
        help="denoise the sample CT with the default weights (the headless main job)",
        description=(
            "Denoise the sample abdominal CT with the bundled default weights and write a derived "
            "DICOM series to a new folder under --output; prints where it went and how long it took."
        ),
    )
    demo.add_argument(
        "--output", default="out", metavar="DIR", help="parent of the new result folder (default: ./out)"
    )
    demo.add_argument("--device", default="auto", metavar="D", help="auto, cpu, cuda or mps (default: auto)")
    demo.add_argument("--batch-size", type=_positive_int, default=None, metavar="N", help="slices per batch")
    demo.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``napari-langmamba`` console script; returns the exit code."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args) or 0)
    except LangMambaError as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    except OSError as exc:  # disk full, permissions: the user's environment, not a bug
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
