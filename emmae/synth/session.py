"""Writing synthetic micrographs to disk: one with its truth, or a whole session.

Owns the file layout (``<name>.mrc``, ``<name>_truth.star``, ``<name>_junk.npy``),
the write order (truth before the micrograph, for watchers) and the per-micrograph
seeds of a session.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from emmae.errors import OutputError
from emmae.io.mrc import write_micrograph
from emmae.io.star import write_star
from emmae.synth.micrograph import make_micrograph
from emmae.synth.params import SynthMicrograph, SynthParams, require

# __package__, not __name__: records keep the logger name "emmae.synth" they had before the split.
log = logging.getLogger(__package__)


def write_micrograph_with_truth(folder: str | Path, name: str, synth: SynthMicrograph) -> tuple[Path, Path]:
    """Write ``<name>_truth.star`` (rlnCoordinateX/Y), ``<name>_junk.npy`` (the junk mask, when there is junk), then ``<name>.mrc``.

    The truth is written first, so a watcher that sees the micrograph finds its truth.

    Raises:
        OutputError: a file could not be written.
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create {folder}: {exc.strerror}") from exc
    mrc, star = folder / f"{name}.mrc", folder / f"{name}_truth.star"
    truth = pd.DataFrame({"rlnCoordinateX": synth.centres_xy[:, 0], "rlnCoordinateY": synth.centres_xy[:, 1]})
    write_star(star, truth)
    if synth.junk is not None:
        try:
            np.save(folder / f"{name}_junk.npy", synth.junk)
        except OSError as exc:
            raise OutputError(f"cannot write {folder / f'{name}_junk.npy'}: {exc.strerror}") from exc
    write_micrograph(mrc, synth.image, synth.params.pixel_size_A)
    return mrc, star


def write_session(folder: str | Path, n: int, params: SynthParams, seed: int = 0, prefix: str = "mic") -> list[Path]:
    """Write ``n`` micrographs ``{prefix}_{i:05d}.mrc`` with truth STARs; return the MRC paths.

    Micrograph ``i`` uses the seed drawn from ``SeedSequence([seed, i])``.

    Raises:
        ValueError: ``n`` is negative, or as :func:`make_micrograph`.
        OutputError: a file could not be written.
    """
    require(n >= 0, "n", f"must be >= 0, got {n}")
    paths = []
    for i in range(n):
        mic_seed = int(np.random.SeedSequence([seed, i]).generate_state(1)[0])
        synth = make_micrograph(params, mic_seed)
        paths.append(write_micrograph_with_truth(folder, f"{prefix}_{i:05d}", synth)[0])
    log.info("wrote %d synthetic micrographs to %s", n, folder)
    return paths
