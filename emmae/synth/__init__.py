"""Synthetic cryo-EM micrographs with particles at known centres.

Used by tests, the demo and benchmarks. Image formation, in order:

1. Projected density: each particle is the projection of a smooth 3-D blob (a sum
   of isotropic 3-D Gaussians, so its projection is a sum of 2-D Gaussians) in a
   random orientation. One to three blob "species" per micrograph, like one protein
   seen in many orientations. Density is normalised so that the mean projected
   density over a particle disk is 1.
2. Phase contrast: the density's spectrum times the CTF
   ``-(sqrt(1-A^2) sin(chi) + A cos(chi)) * exp(-B k^2 / 4)`` (Cs 2.7 mm). The
   transform is periodic, so CTF delocalisation wraps around the edges. Low spatial
   frequencies have a negative CTF, so protein is darker than the background.
3. Background: ``dose * pixel_size^2`` counts per pixel, modulated by the relative
   ice thickness (a linear ramp in a random direction plus a very low-frequency
   component); carbon film and contaminants absorb electrons (darker) and add
   phase density of their own (Fresnel fringes, carbon texture).
4. Shot noise: Gaussian approximation of Poisson noise, std ``sqrt(expected counts)``.

SNR: the signal energy of all particles (after the CTF, in counts) per pixel of
particle-disk area, divided by the noise variance at the mean dose. The particle
contrast is set to give the requested SNR under plain Poisson noise at the given
dose; when that would need more than ``MAX_RMS_CONTRAST`` rms contrast, the contrast
stays there and the noise is scaled down instead.

Truth is complete: carbon film and contaminants never hold particles, so every
particle in the image is in ``centres_xy``. Coordinates are ``(x, y)`` = (column,
row), 0-based pixel centres; images are ``data[row, col]``.

Layout of the package (each module's docstring says what it owns):

- :mod:`.params`: :class:`SynthParams`, :class:`SynthMicrograph` and their validation;
- :mod:`.particles`: particle shapes and their projected density;
- :mod:`.layout`: random non-overlapping particle centres clear of the junk;
- :mod:`.junk`: carbon film, contaminants and aggregates, their maps and the junk mask;
- :mod:`.imaging`: CTF, phase contrast at the requested SNR, ice background, shot noise;
- :mod:`.micrograph`: :func:`make_micrograph`, the order the random stream is used in;
- :mod:`.session`: :func:`write_micrograph_with_truth` and :func:`write_session`.

This package is the one public surface: the rest of the project imports ``emmae.synth``,
never its modules. The names the modules share with each other are public within the
package (no module imports another's ``_private`` names) but not exported here.
"""

from emmae.synth.imaging import CS_A, NOISE_BLOCKS, ctf, electron_wavelength_A
from emmae.synth.junk import CARBON_DENSITY, CARBON_OPACITY, CARBON_TEXTURE, CONTAMINANT_DENSITY, CONTAMINANT_OPACITY, FEATURE_TRIES
from emmae.synth.layout import MIN_SEPARATION, PACKING, RSA_JAMMING
from emmae.synth.micrograph import make_micrograph
from emmae.synth.params import MAX_RMS_CONTRAST, SynthMicrograph, SynthParams
from emmae.synth.particles import PATCH
from emmae.synth.session import write_micrograph_with_truth, write_session

__all__ = [
    "CARBON_DENSITY",
    "CARBON_OPACITY",
    "CARBON_TEXTURE",
    "CONTAMINANT_DENSITY",
    "CONTAMINANT_OPACITY",
    "CS_A",
    "FEATURE_TRIES",
    "MAX_RMS_CONTRAST",
    "MIN_SEPARATION",
    "NOISE_BLOCKS",
    "PACKING",
    "PATCH",
    "RSA_JAMMING",
    "SynthMicrograph",
    "SynthParams",
    "ctf",
    "electron_wavelength_A",
    "make_micrograph",
    "write_micrograph_with_truth",
    "write_session",
]
