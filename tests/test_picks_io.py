"""Pick files: RELION coordinates and index, combined particles, EMAN box, crYOLO cbox."""

from __future__ import annotations

import numpy as np
import pytest
import starfile

from emmae.config import OutputConfig
from emmae.io.layout import coordinate_stem, micrograph_name
from emmae.io.picks import (
    Optics,
    transform_xy,
    write_box,
    write_cbox,
    write_index,
    write_particles,
    write_relion_coordinates,
)
from emmae.io.truth import read_centres

XY = np.array([[10.5, 20.25], [100.0, 200.0]])
SCORE = np.array([0.5, 1.25])


def test_relion_coordinates_round_trip(tmp_path):
    path = tmp_path / "mic_autopick.star"
    write_relion_coordinates(path, XY, SCORE)
    frame = starfile.read(path)
    assert list(frame.columns) == ["rlnCoordinateX", "rlnCoordinateY", "rlnClassNumber", "rlnAutopickFigureOfMerit", "rlnAnglePsi"]
    np.testing.assert_allclose(read_centres(path), XY)
    np.testing.assert_allclose(frame["rlnAutopickFigureOfMerit"], SCORE)


def test_index_and_particles(tmp_path):
    write_index(tmp_path / "autopick.star", [("MotionCorr/job002/Movies/a.mrc", "picks/a_autopick.star")])
    index = starfile.read(tmp_path / "autopick.star", always_dict=True)
    assert list(index) == ["coordinate_files"]
    assert index["coordinate_files"]["rlnMicrographName"].tolist() == ["MotionCorr/job002/Movies/a.mrc"]
    write_particles(tmp_path / "particles.star", [("a.mrc", XY, SCORE, None), ("b.mrc", XY[:1], SCORE[:1], None)])
    particles = starfile.read(tmp_path / "particles.star", always_dict=True)["particles"]
    assert particles["rlnMicrographName"].tolist() == ["a.mrc", "a.mrc", "b.mrc"]
    write_particles(tmp_path / "empty.star", [])
    assert tmp_path.joinpath("empty.star").is_file()


def test_box_is_lower_left_corner(tmp_path):
    write_box(tmp_path / "a.box", XY, 50)
    rows = np.loadtxt(tmp_path / "a.box", ndmin=2)
    np.testing.assert_array_equal(rows, [[-14, -5, 50, 50], [75, 175, 50, 50]])
    np.testing.assert_allclose(read_centres(tmp_path / "a.box"), XY, atol=1.0)  # integer corners


def test_cbox_holds_every_candidate(tmp_path):
    write_cbox(tmp_path / "a.cbox", XY, SCORE, 50.0)
    blocks = starfile.read(tmp_path / "a.cbox", always_dict=True)
    assert set(blocks) == {"global", "cryolo", "cryolo_include"}  # CBOX 1.0; the include list is empty in 2-D
    assert len(blocks["cryolo_include"]) == 0
    boxes = blocks["cryolo"]
    np.testing.assert_allclose(boxes["CoordinateX"] + 25, XY[:, 0])
    np.testing.assert_allclose(boxes["Confidence"], SCORE)


def test_explicit_switches():
    shape = (300, 400)  # ny, nx
    np.testing.assert_allclose(transform_xy(XY, shape, OutputConfig()), XY)
    np.testing.assert_allclose(transform_xy(XY, shape, OutputConfig(flip_y=True)), [[10.5, 278.75], [100.0, 99.0]])
    np.testing.assert_allclose(transform_xy(XY, shape, OutputConfig(flip_y=True, coordinate_scale=2)), [[21.0, 557.5], [200.0, 198.0]])
    assert micrograph_name("/data/x/Movies/a.mrc", OutputConfig(strip_prefix="/data/x/", add_prefix="J12/")) == "J12/Movies/a.mrc"


def test_name_relative_to_project_root(tmp_path):
    path = tmp_path / "MotionCorr" / "a.mrc"
    assert micrograph_name(path, OutputConfig(project_root=tmp_path)) == "MotionCorr/a.mrc"
    assert micrograph_name("/elsewhere/a.mrc", OutputConfig(project_root=tmp_path)) == "/elsewhere/a.mrc"


@pytest.mark.parametrize("flip", [False, True])
def test_flip_twice_is_identity(flip):
    once = transform_xy(XY, (512, 512), OutputConfig(flip_y=flip))
    np.testing.assert_allclose(transform_xy(once, (512, 512), OutputConfig(flip_y=flip)), XY)


def test_cbox_keeps_boxes_inside_the_micrograph_and_reads_back(tmp_path):
    xy = np.array([[10.0, 100.0], [100.0, 100.0], [180.0, 30.0], [100.0, 190.0]])
    write_cbox(tmp_path / "a.cbox", xy, np.array([0.1, 0.2, 0.3, 0.4]), 40.0, particle_px=26.0, size_xy=(200.0, 210.0))
    boxes = starfile.read(tmp_path / "a.cbox", always_dict=True)["cryolo"]
    corners = xy - 20.0
    inside = np.all((corners >= 0) & (corners + 40 <= [200.0, 210.0]), axis=1)
    assert inside.tolist() == [False, True, True, True]
    np.testing.assert_allclose(boxes["Confidence"], [0.2, 0.3, 0.4])
    np.testing.assert_allclose(boxes["EstWidth"], 26.0)
    np.testing.assert_allclose(boxes["EstHeight"], 26.0)
    np.testing.assert_allclose(read_centres(tmp_path / "a.cbox"), xy[inside])


@pytest.mark.parametrize(("name", "stem"), [
    ("MotionCorr/job002/Movies/a.mrc", "Movies/a"),  # the job folder dropped, as RELION 3.1's --coord_dir expects
    ("a/b/job017/c/d.tiff.mrc", "c/d.tiff"),
    ("Micrographs/a.mrc", "Micrographs/a"),  # no job folder: the whole name
    ("./Micrographs/a.mrc", "Micrographs/a"),
    ("job001/a.mrc", "job001/a"),  # a job folder is a part after the first
    ("Movies/job001.mrc", "Movies/job001"),  # a file is no job folder
    ("/data/a.mrc", None),
    ("../a.mrc", None),
])
def test_coordinate_stem_is_where_relion_looks(name, stem):
    assert coordinate_stem(name) == stem


def test_particles_with_optics_are_a_relion_particles_file(tmp_path):
    write_particles(tmp_path / "p.star", [("a.mrc", XY, SCORE, 1.1), ("b.mrc", XY[:1], SCORE[:1], 0.9), ("c.mrc", XY, SCORE, 1.1)],
                    Optics(200.0, 1.4, 0.07))
    blocks = starfile.read(tmp_path / "p.star", always_dict=True)
    optics, particles = blocks["optics"], blocks["particles"]
    assert optics["rlnMicrographPixelSize"].tolist() == [0.9, 1.1] and optics["rlnOpticsGroup"].tolist() == [1, 2]
    assert optics["rlnVoltage"].tolist() == [200.0, 200.0] and optics["rlnSphericalAberration"].tolist() == [1.4, 1.4]
    assert optics["rlnAmplitudeContrast"].tolist() == [0.07, 0.07]
    group = dict(zip(particles["rlnMicrographName"], particles["rlnOpticsGroup"]))
    assert group == {"a.mrc": 2, "b.mrc": 1, "c.mrc": 2}
    write_particles(tmp_path / "q.star", [("a.mrc", XY, SCORE, 1.1), ("b.mrc", XY, SCORE, None)], Optics())
    assert list(starfile.read(tmp_path / "q.star", always_dict=True)) == ["particles"]  # a pixel size unknown: no optics block


def test_micrograph_names_are_below_the_project_folder(tmp_path, monkeypatch):
    (tmp_path / "Micrographs").mkdir()
    monkeypatch.chdir(tmp_path)
    assert micrograph_name(tmp_path / "Micrographs" / "a.mrc", OutputConfig()) == "Micrographs/a.mrc"  # absolute, below the current folder
    assert micrograph_name("Micrographs/a.mrc", OutputConfig()) == "Micrographs/a.mrc"
    assert micrograph_name("/elsewhere/a.mrc", OutputConfig()) == "/elsewhere/a.mrc"


def test_particles_optics_come_from_the_micrographs_star_unless_given(tmp_path):
    import pandas as pd

    from emmae.config import validate_config
    from emmae.runtime.outputs import optics_of, with_star_optics

    star = tmp_path / "micrographs.star"
    optics = pd.DataFrame({"rlnOpticsGroupName": ["opticsGroup1"], "rlnOpticsGroup": [1], "rlnMicrographPixelSize": [1.1],
                           "rlnVoltage": [200.0], "rlnSphericalAberration": [1.4], "rlnAmplitudeContrast": [0.07]})
    starfile.write({"optics": optics, "micrographs": pd.DataFrame({"rlnMicrographName": ["a.mrc"], "rlnOpticsGroup": [1]})}, star)
    assert optics_of(validate_config({})) == Optics(300.0, 2.7, 0.1)  # RELION's import defaults
    assert optics_of(with_star_optics(validate_config({}), [tmp_path / "missing.star", star])) == Optics(200.0, 1.4, 0.07)
    given = validate_config({"output": {"voltage_kV": 300.0}})
    assert optics_of(with_star_optics(given, [star])) == Optics(300.0, 1.4, 0.07)  # a value given wins over the STAR's
