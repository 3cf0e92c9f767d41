"""Our picks in RELION's hands: the real RELION 3.1 binaries extract every pick, from every input form.

A synthetic RELION project (micrographs under ``MotionCorr/job002/Movies/``, imported by
``relion_import``) is picked by ``emmae-pick`` from its micrographs STAR, its folder and a
glob, and by ``emmae-stream``; ``relion_preprocess --extract`` with ``--coord_dir`` then
finds every pick of every micrograph, and the extracted particles average to a centred
particle. Skipped, with the reason, where RELION is not installed (``apt-get install relion``).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import mrcfile
import numpy as np
import pytest
import scipy.ndimage as ndi
import starfile

from emmae.io.picks import write_relion_coordinates
from emmae.io.truth import read_centres
from emmae.runtime.picking.bundle import default_bundle_path
from emmae.synth import SynthParams, write_session

pytestmark = [
    pytest.mark.relion,
    pytest.mark.skipif(shutil.which("relion_preprocess") is None, reason="RELION is not installed (apt-get install relion)"),
    pytest.mark.skipif(not default_bundle_path().is_file(), reason="no bundled model"),
]

PIXEL_A = 2.0
DIAMETER_PX = 36.0
BOX_PX = 56  # about 1.5 diameters
MOVIES = "MotionCorr/job002/Movies"
RELION_PAGE = Path(__file__).resolve().parents[1] / "docs" / "relion.md"  # the commands users copy


def run(args: list[str], cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    done = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=300, check=False, env=env)
    assert done.returncode == 0, f"{args[0]} exited {done.returncode}:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
    return done


def emmae(command: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    code = f"import sys; from emmae.runtime.commands.{command} import main; sys.exit(main(sys.argv[1:]))"
    return run([sys.executable, "-c", code, *args], cwd)


def extract(project: Path, coord_dir: str, job: str, *extra: str) -> dict[str, int]:
    """``relion_preprocess --extract`` of the imported micrographs at the coordinates in ``coord_dir``: particles per micrograph."""
    (project / job).mkdir(parents=True, exist_ok=True)
    run(["relion_preprocess", "--i", "Import/job001/micrographs.star", "--coord_dir", coord_dir, "--coord_suffix", "_autopick.star",
         "--part_star", f"{job}/particles.star", "--part_dir", f"{job}/", "--extract", "--extract_size", str(BOX_PX), *extra], project)
    return per_micrograph(project / job / "particles.star")


def per_micrograph(star: Path) -> dict[str, int]:
    particles = starfile.read(star, always_dict=True)["particles"]
    return {str(k): int(v) for k, v in particles.groupby("rlnMicrographName").size().items()}


def ours(out: Path, names: dict[str, str] | None = None) -> dict[str, int]:
    """Particles per micrograph in our ``particles.star`` (``names``: ours -> RELION's)."""
    counts = per_micrograph(out / "particles.star")
    return {(names or {}).get(k, k): v for k, v in counts.items()}


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A RELION project: 3 non-square synthetic micrographs in a job folder, imported with ``relion_import``."""
    root = tmp_path_factory.mktemp("relion-project")
    params = SynthParams(shape=(640, 832), diameter_px=DIAMETER_PX, pixel_size_A=PIXEL_A, n_particles=70, snr=0.2)
    write_session(root / MOVIES, 3, params, seed=11)
    (root / "Import/job001").mkdir(parents=True)
    run(["relion_import", "--do_micrographs", "--i", f"{MOVIES}/*.mrc", "--odir", "Import/job001/", "--ofile", "micrographs.star",
         "--angpix", str(PIXEL_A)], root)
    return root


@pytest.fixture(scope="module")
def from_star(project) -> Path:
    emmae("pick", "Import/job001/micrographs.star", "--diameter-px", str(DIAMETER_PX), "--out", "AutoPick/job003", "--format", "star",
          "box", "cbox", cwd=project)
    return project / "AutoPick/job003"


def relion_names(project: Path) -> list[str]:
    return [str(n) for n in starfile.read(project / "Import/job001/micrographs.star", always_dict=True)["micrographs"]["rlnMicrographName"]]


def test_every_pick_of_a_micrographs_star_is_extracted(project, from_star):
    assert sorted(p.relative_to(from_star).as_posix() for p in from_star.rglob("*_autopick.star") if p.parent != from_star) == [
        f"Movies/mic_{i:05d}_autopick.star" for i in range(3)]  # the job folder dropped, as RELION does
    counts = ours(from_star)
    assert sorted(counts) == relion_names(project) and all(n > 20 for n in counts.values())
    assert extract(project, "AutoPick/job003/", "Extract/job010") == counts


@pytest.mark.parametrize("form", ["folder", "glob"])
def test_every_pick_of_a_folder_or_a_glob_is_extracted(project, form):
    """Names below the project folder (the current one), the coordinate files where RELION looks."""
    given = f"{MOVIES}/" if form == "folder" else str(project / MOVIES / "*.mrc")  # a glob of absolute paths, below the project
    out = f"AutoPick/{form}"
    emmae("pick", given, "--diameter-px", str(DIAMETER_PX), "--out", out, cwd=project)
    counts = ours(project / out)
    assert sorted(counts) == relion_names(project)
    assert extract(project, f"{out}/", f"Extract/{form}") == counts


def test_every_pick_of_a_stream_is_extracted(project):
    """The stream's names are below the watched folder's parent; its coordinate files are where RELION looks all the same."""
    emmae("stream", "--watch", MOVIES, "--once", "--diameter-px", str(DIAMETER_PX), "--settle-s", "0", "--out", "AutoPick/stream",
          "--poll", cwd=project)
    counts = ours(project / "AutoPick/stream", {f"Movies/mic_{i:05d}.mrc": f"{MOVIES}/mic_{i:05d}.mrc" for i in range(3)})
    assert sorted(counts) == relion_names(project)
    assert extract(project, "AutoPick/stream/", "Extract/stream") == counts


def test_particles_star_is_a_relion_particles_file(project, from_star):
    """Its optics block (from the imported STAR's) lets RELION re-extract from it: every pick again."""
    optics = starfile.read(from_star / "particles.star", always_dict=True)["optics"]
    assert optics["rlnMicrographPixelSize"].tolist() == [PIXEL_A] and optics["rlnVoltage"].tolist() == [300.0]
    (project / "Extract/reextract").mkdir(parents=True)
    run(["relion_preprocess", "--i", "Import/job001/micrographs.star", "--reextract_data_star", str(from_star / "particles.star"),
         "--part_star", "Extract/reextract/particles.star", "--part_dir", "Extract/reextract/", "--extract", "--extract_size", str(BOX_PX)],
        project)
    assert per_micrograph(project / "Extract/reextract/particles.star") == ours(from_star)


def centre_and_contrast(project: Path, job: str) -> tuple[np.ndarray, float]:
    """The average of a job's extracted particles (smoothed by a quarter diameter): the offset ``[dx, dy]`` (px) of
    its darkest point from the box centre (RELION's: pixel ``size // 2``), to a tenth of a pixel (parabola through
    the neighbours), and the depth there in standard deviations of the box's border."""
    stacks = [mrcfile.read(p) for p in sorted((project / job).rglob("*.mrcs"))]
    average = np.concatenate([s.reshape(-1, BOX_PX, BOX_PX) for s in stacks]).astype(np.float64).mean(axis=0)
    smooth = ndi.gaussian_filter(average, DIAMETER_PX / 8)
    row, col = np.unravel_index(np.argmin(smooth), smooth.shape)
    def vertex(a: float, b: float, c: float) -> float:
        return 0.5 * (a - c) / (a - 2 * b + c)
    dx = col + vertex(*smooth[row, col - 1: col + 2])
    dy = row + vertex(*smooth[row - 1: row + 2, col])
    rows, cols = np.indices(average.shape)
    border = average[np.hypot(rows - BOX_PX // 2, cols - BOX_PX // 2) > 0.75 * BOX_PX / 2]
    return np.array([dx, dy]) - BOX_PX // 2, float((np.median(border) - smooth[row, col]) / border.std())


def test_extracted_particles_average_to_a_centred_particle(project, from_star):
    """No flip, no x/y swap, no half-pixel shift: the average of our extracted picks is centred within 1 px, as
    centred as the true centres extracted alike, and nearly as deep.

    RELION cuts the box at the coordinate's whole pixel below, so even true centres average
    about half a pixel right and down of the box centre (measured on the micrograph itself,
    they are centred to 0.1 px)."""
    truth_dir = project / "Truth"
    (truth_dir / "Movies").mkdir(parents=True)
    for i in range(3):
        centres = read_centres(project / MOVIES / f"mic_{i:05d}_truth.star")
        write_relion_coordinates(truth_dir / "Movies" / f"mic_{i:05d}_autopick.star", centres, np.ones(len(centres)))
    extract(project, "Truth/", "Extract/truth")
    extract(project, "AutoPick/job003/", "Extract/centring")
    truth_offset, truth_depth = centre_and_contrast(project, "Extract/truth")
    offset, depth = centre_and_contrast(project, "Extract/centring")
    assert np.all(np.abs(truth_offset) < 0.75), truth_offset
    assert np.all(np.abs(offset) < 1.0) and np.all(np.abs(offset - truth_offset) < 0.35), (offset, truth_offset)
    assert depth > 0.7 * truth_depth > 0, (depth, truth_depth)


def nearest_px(found: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """For each of ``found [N, 2]``, its distance to the nearest of ``centres [M, 2]``."""
    return np.min(np.linalg.norm(found[:, None, :] - centres[None, :, :], axis=2), axis=1)


def test_box_and_cbox_read_back_to_the_same_centres(from_star):
    """EMAN's lower-left corner plus half a box gives our STAR's centre (to the corner's whole pixel); crYOLO's (to its
    hundredth of a pixel) among every candidate. Boxes reaching outside the micrograph are in neither."""
    width, height = 832, 640
    for star in sorted((from_star / "Movies").glob("*_autopick.star")):
        centres = read_centres(star)
        box = np.loadtxt(star.with_name(star.name.replace("_autopick.star", ".box")), ndmin=2)
        size = box[0, 2]
        margin = np.minimum(np.minimum(centres[:, 0], width - centres[:, 0]), np.minimum(centres[:, 1], height - centres[:, 1])) - size / 2
        from_box = box[:, :2] + box[:, 2:4] / 2
        assert np.all(nearest_px(from_box, centres) <= 0.71)
        assert np.sum(margin >= 1) <= len(from_box) <= np.sum(margin >= -1)
        cbox = starfile.read(star.with_name(star.name.replace("_autopick.star", ".cbox")), always_dict=True)["cryolo"]
        from_cbox = cbox[["CoordinateX", "CoordinateY"]].to_numpy() + cbox[["Width", "Height"]].to_numpy() / 2
        assert np.all(nearest_px(centres[margin >= 0.01], from_cbox) <= 0.02)


def relion_page_commands() -> str:
    """docs/relion.md's RELION commands: the bash block after the line ``<!-- relion-commands -->``."""
    text = RELION_PAGE.read_text()
    found = re.search(r"<!-- relion-commands -->\s*```bash\n(.*?)```", text, re.S)
    assert found, "docs/relion.md has no <!-- relion-commands --> block"
    return found.group(1)


def test_the_readme_relion_commands_run_as_written(tmp_path):
    """docs/relion.md's import, pick and extract, run as they are in a fresh project of micrographs in ``Micrographs/``."""
    params = SynthParams(shape=(640, 640), diameter_px=DIAMETER_PX, pixel_size_A=PIXEL_A, n_particles=40)
    write_session(tmp_path / "Micrographs", 2, params, seed=5)
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "PIXEL_A": str(PIXEL_A),
           "DIAMETER_A": str(DIAMETER_PX * PIXEL_A), "BOX_PX": str(BOX_PX)}
    if shutil.which("emmae-pick", path=env["PATH"]) is None:
        pytest.skip("emmae-pick is not installed as a command (pip install -e .)")
    run(["bash", "-euo", "pipefail", "-c", relion_page_commands()], tmp_path, env)
    extracted = per_micrograph(tmp_path / "Extract/job003/particles.star")
    picked = per_micrograph(tmp_path / "AutoPick/job002/particles.star")
    assert extracted == picked and sum(picked.values()) > 40
